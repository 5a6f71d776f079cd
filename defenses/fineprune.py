"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018, arXiv 1805.12185).

Backdoor neurons are dormant on clean inputs: rank the last feature layer's channels by their mean activation
on clean data, prune them in ascending order, then fine-tune. Pruning masks the classifier's input columns
(exact for average-pooled features, as BackdoorBench does) and the mask is kept during fine-tuning.

Deliberate deviations: the stopping rule uses the *held-out part of the defense pool* (BackdoorBench uses the
test set), and the kept mask is the last one *within* the tolerance (BackdoorBench keeps the one that broke it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Defense, DefenseOutput, ThreatModel, param
from .common import (
    fine_tune,
    head,
    last_feature_layer,
    last_layer_activations,
    mask_linear_inputs,
    pool_accuracy,
    pool_monitor,
)
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
class FinePrune(Defense):
    name = "fineprune"
    title = "Fine-Pruning"
    paper = "Liu et al., RAID 2018 (arXiv 1805.12185)"
    summary = ("Prunes the last-layer channels that stay quiet on clean images, where backdoor neurons tend to hide, "
               "until clean accuracy starts to suffer; then fine-tunes on clean data.")
    threat = ThreatModel(clean_pool=True)
    Params = FinePruneParams
    presets = {"quick": {"epochs": 20, "lr": 0.05, "batch_size": 64}, "paper": {}}

    def repair(self, suspect, model, params, pool, device, progress, should_stop):
        acts = last_layer_activations(model, pool["x"], device)
        mean_act = acts.mean(dim=(0, 2, 3))
        order = mean_act.argsort().tolist()  # ascending: dormant first
        n_ch = len(order)
        step = max(1, int(round(params.once_prune_ratio * n_ch)))
        lin = head(model)
        original = lin.weight.detach().clone()
        base = pool_accuracy(model, pool["x_val"], pool["y_val"], device)
        kept_k, curve = 0, [{"pruned": 0, "held_out_ba": base}]
        limit = int(params.max_ratio * n_ch)
        for k in range(step, limit + 1, step):
            with torch.no_grad():
                lin.weight.copy_(original)
            mask_linear_inputs(model, order[:k])
            ba = pool_accuracy(model, pool["x_val"], pool["y_val"], device)
            curve.append({"pruned": k, "held_out_ba": ba})
            progress(0.5 * k / max(limit, 1), f"pruning {k}/{n_ch} channels", {"held_out_ba": ba})
            if base - ba > params.acc_ratio * base:
                break
            kept_k = k
        with torch.no_grad():
            lin.weight.copy_(original)
        reapply = mask_linear_inputs(model, order[:kept_k])
        if params.epochs > 0:
            fine_tune(model, pool["x"], pool["y"], device, params.epochs, params.lr, params.batch_size,
                      after_step=reapply, progress=lambda f, m, d: progress(0.5 + 0.5 * f, m, d),
                      monitor=pool_monitor(model, pool, suspect.trigger, device))
        return DefenseOutput(model, {
            "layer": last_feature_layer(model),
            "pruned_channels": sorted(order[:kept_k]),
            "n_pruned": kept_k,
            "n_channels": n_ch,
            "held_out_ba_after": pool_accuracy(model, pool["x_val"], pool["y_val"], device),
        }, {"prune_curve": curve})
