"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018, arXiv 1805.12185).

Backdoor neurons are dormant on clean inputs: rank the last feature layer's channels by their mean activation
on clean data, prune them in ascending order, then fine-tune. Pruning masks the classifier's input columns
(exact for average-pooled features, as BackdoorBench does) and the mask is kept during fine-tuning.

Deliberate deviations: the stopping rule uses the *held-out part of the defense pool* (BackdoorBench uses the
test set), and the kept mask is the last one *within* the tolerance (BackdoorBench keeps the one that broke it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import ThreatModel, param
from .common import fine_tune, last_layer_activations, pool_accuracy
from .context import RepairContext
from .pruning import RankedPruning
from .registry import register_defense


@dataclass
class FinePruneParams:
    acc_ratio: float = param(0.1, help="stop pruning once held-out BA falls by this share of its start value",
                             min=0.0, max=1.0)
    once_prune_ratio: float = param(0.01, help="share of channels pruned per step", min=0.001, max=0.5)
    max_ratio: float = param(0.95, help="never prune more than this share of channels", min=0.0, max=1.0)
    epochs: int = param(100, help="fine-tuning epochs after pruning (0 = prune only)", min=0, max=1000)
    lr: float = param(0.01, help="fine-tuning SGD learning rate", min=1e-6, max=1.0)
    batch_size: int = param(256, help="fine-tuning batch size", min=1, max=4096)


@register_defense
class FinePrune(RankedPruning):
    name = "fineprune"
    title = "Fine-Pruning"
    paper = "Liu et al., RAID 2018 (arXiv 1805.12185)"
    summary = ("Prunes the last-layer channels that stay quiet on clean images, where backdoor neurons tend to hide, "
               "until clean accuracy starts to suffer; then fine-tunes on clean data.")
    order = 50
    threat = ThreatModel(clean_pool=True)
    Params = FinePruneParams
    presets = {"quick": {"epochs": 20, "lr": 0.05, "batch_size": 64}, "paper": {}}
    prune_share = 0.5
    sort_pruned = True

    def rank_channels(self, model, params: FinePruneParams, ctx: RepairContext) -> tuple[list[int], dict[str, Any]]:
        """Ascending mean activation on the pool's clean training images: dormant channels first."""
        acts = last_layer_activations(model, ctx.pool.x, ctx.device)
        return acts.mean(dim=(0, 2, 3)).argsort().tolist(), {}

    def step_size(self, n_channels: int, params: FinePruneParams) -> int:
        return max(1, int(round(params.once_prune_ratio * n_channels)))

    def tolerated(self, base, now, params: FinePruneParams) -> bool:
        return base["held_out_ba"] - now["held_out_ba"] <= params.acc_ratio * base["held_out_ba"]

    def after_pruning(self, model, params: FinePruneParams, ctx: RepairContext, reapply) -> dict[str, Any]:
        if params.epochs > 0:
            fine_tune(model, ctx, epochs=params.epochs, lr=params.lr, batch_size=params.batch_size, after_step=reapply,
                      span=(0.5, 1.0))
        return {"held_out_ba_after": pool_accuracy(model, ctx.pool.x_val, ctx.pool.y_val, ctx.device)}
