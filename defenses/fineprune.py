"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018, arXiv 1805.12185).

Backdoor neurons are dormant on clean inputs: rank the last feature layer's channels by their mean activation
on clean data, prune them in ascending order, then fine-tune. The activation is the one after the ReLU, as in the
paper and the official code (Caffe, ``face/conv_output_prune.py``: the mean of ``pool3``, the max-pooled output of
the ReLU after ``conv3``): here the mean of ReLU(a) over images and positions. The hooked output of a
pre-activation block (``layer4.1`` of PreActResNet-18) has no ReLU, and its signed mean would rank strongly
negative, active channels as "dormant"; ReLU(a) ranks them by how much they fire. ``activation='signed'``, this
project's former statistic, is kept as an option. Pruning masks the classifier's input columns (exact for
average-pooled features, as BackdoorBench does) and the mask is kept during fine-tuning.

Deliberate deviations (``docs/fidelity.md``): the stopping rule uses the *held-out part of the defense pool*
(BackdoorBench uses the test set), the kept mask is the last one *within* the tolerance (BackdoorBench keeps the
one that broke it), and the mean is taken over the map itself, not over a max-pooled copy (our feature maps are
average-pooled into the classifier). The fine-tuning budget is counted in optimisation steps (``steps``;
BackdoorBench's 100 epochs over 2,500 images in batches of 256 are 1,000 steps); ``quick``: 140 steps of 64 at lr
0.05 (the former 20 passes over a 400-image pool), kept after it was measured on the development split over
seeds 0-2 (below): it removes BadNets there at a BA drop of 0.025 in under a minute, so nothing cheaper or longer
was tried; no budget tried with this method removes Blended (ASR 0.91).

``quick`` measured on the development split (2,000 Fashion-MNIST images the demo never used;
``scripts/capacity_study.py``, 1,000-image pool kept out of training, seeds 0-2; BA drop / ASR, mean +- sd,
seconds): width 16 (bundle v2): BadNets 0.025 +- 0.001 / 0.045 +- 0.023 (52 s), Blended 0.031 +- 0.019 / 0.909 +-
0.058 (46 s); width 8: BadNets 0.032 +- 0.007 / 0.110 +- 0.110 (16 s), Blended 0.034 +- 0.006 / 0.644 +- 0.028 (14
s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import ThreatModel, param
from .common import fine_tune, last_layer_activations, pool_accuracy
from .context import RepairContext
from .pruning import RankedPruning
from .registry import register_defense


def mean_activation(acts: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """Per channel mean of ReLU(a) (or of the signed a) over images and positions of (N, C, h, w) maps."""
    return (acts.clamp_min(0) if activation == "relu" else acts).mean(dim=(0, 2, 3))


@dataclass
class FinePruneParams:
    activation: str = param("relu", help="statistic that ranks channels: mean of ReLU(a) as in the paper, or the "
                            "signed mean of a", choices=("relu", "signed"))
    acc_ratio: float = param(0.1, help="stop pruning once held-out BA falls by this share of its start value",
                             min=0.0, max=1.0)
    once_prune_ratio: float = param(0.01, help="share of channels pruned per step", min=0.001, max=0.5)
    max_ratio: float = param(0.95, help="never prune more than this share of channels", min=0.0, max=1.0)
    steps: int = param(1000, help="fine-tuning steps after pruning (0 = prune only); BackdoorBench's 100 epochs over "
                                  "2,500 images in batches of 256 are 1,000 steps", min=0, max=100000)
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
    needs = ("feature_map", "pooled_head", "linear_head", "rebuildable", "trainable")
    threat = ThreatModel(clean_pool=True)
    Params = FinePruneParams
    presets = {"quick": {"steps": 140, "lr": 0.05, "batch_size": 64}, "paper": {}}
    prune_share = 0.5
    sort_pruned = True

    def rank_channels(self, model, params: FinePruneParams, ctx: RepairContext) -> tuple[list[int], dict[str, Any]]:
        """Ascending mean post-ReLU activation on the pool's clean training images: dormant channels first."""
        acts = last_layer_activations(model, ctx.pool.x, ctx.device)
        score = mean_activation(acts, params.activation)
        return score.argsort(stable=True).tolist(), {"score": "E[ReLU(A_k(x))]" if params.activation == "relu"
                                                     else "E[A_k(x)]"}

    def step_size(self, n_channels: int, params: FinePruneParams) -> int:
        return max(1, int(round(params.once_prune_ratio * n_channels)))

    def tolerated(self, base, now, params: FinePruneParams) -> bool:
        return base["held_out_ba"] - now["held_out_ba"] <= params.acc_ratio * base["held_out_ba"]

    def after_pruning(self, model, params: FinePruneParams, ctx: RepairContext, reapply) -> dict[str, Any]:
        if params.steps > 0:
            fine_tune(model, ctx, steps=params.steps, lr=params.lr, batch_size=params.batch_size, after_step=reapply,
                      span=(0.5, 1.0))
        return {"held_out_ba_after": pool_accuracy(model, ctx.pool.x_val, ctx.pool.y_val, ctx.device)}
