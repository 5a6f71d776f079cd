"""l_inf neuron pruning, after Xu et al. (arXiv 2002.12162).

A trigger causes a sparse spike in a few channels of the last feature layer, which dominates their l_inf
norm. Score each channel by s_k = E||A_k(x + trigger)||_inf - E||A_k(x)||_inf on clean pool images and their
triggered copies, and prune the top-scoring channels (classifier input columns zeroed, exact for pooled
features). No official code exists; the rule and its selection are our design:
prune the fewest channels that bring the pool ASR (held-out pool images with the trigger) below
``target_asr``, never more than ``max_ratio`` of the layer nor beyond a held-out BA drop of ``ba_tolerance``.

Threat model: needs a trigger. With a known trigger this is an *oracle* setting; a recovered trigger
(Neural-Cleanse style) makes it a practical one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Defense, DefenseOutput, ThreatModel, param
from .common import (
    head,
    last_feature_layer,
    last_layer_activations,
    mask_linear_inputs,
    pool_accuracy,
    pool_asr,
)
from .registry import register_defense


@dataclass
class LinfPruneParams:
    norm: str = param("linf", help="activation norm that scores channels (l_inf is the paper's signal)",
                      choices=("linf", "l2", "l1"))
    max_ratio: float = param(0.1, help="prune at most this share of the layer's channels", min=0.0, max=1.0)
    target_asr: float = param(0.05, help="stop once the held-out pool ASR is at or below this", min=0.0, max=1.0)
    ba_tolerance: float = param(0.05, help="largest allowed drop of held-out pool BA (absolute)", min=0.0, max=1.0)


def _norm(a: torch.Tensor, kind: str) -> torch.Tensor:
    flat = a.abs().flatten(2)
    if kind == "linf":
        return flat.amax(2)
    if kind == "l2":
        return flat.pow(2).sum(2).sqrt()
    return flat.sum(2)


@register_defense
class LinfPrune(Defense):
    name = "linf_prune"
    title = "l_inf neuron pruning"
    paper = "after Xu et al., arXiv 2002.12162"
    summary = ("Finds the last-layer channels whose strongest response (l_inf norm) jumps when the trigger is "
               "present and prunes them. A partial defense that needs a trigger, known or recovered.")
    threat = ThreatModel(clean_pool=True, trigger=True, note="with the known trigger this is an oracle setting")
    Params = LinfPruneParams
    # paper: the 5-10% budget the reference suggests ([design], no official values); quick: on the narrow demo
    # models the backdoor spreads over many channels, so allow up to half the layer within a larger BA tolerance
    # (the pool images were training images, so their BA falls faster than test BA as channels go).
    presets = {"quick": {"max_ratio": 0.5, "target_asr": 0.2, "ba_tolerance": 0.15}, "paper": {}}

    def repair(self, suspect, model, params, pool, device, progress, should_stop):
        trigger = suspect.trigger
        x = pool["x"]
        mask = trigger.test_mask(pool["y"])
        clean_a = last_layer_activations(model, x[mask], device)
        trig_a = last_layer_activations(model, trigger(x[mask]), device)
        score = _norm(trig_a, params.norm).mean(0) - _norm(clean_a, params.norm).mean(0)
        order = score.argsort(descending=True).tolist()
        n_ch = len(order)
        limit = int(params.max_ratio * n_ch)
        lin = head(model)
        original = lin.weight.detach().clone()
        base_ba = pool_accuracy(model, pool["x_val"], pool["y_val"], device)
        base_asr = pool_asr(model, pool["x_val"], pool["y_val"], trigger, device)
        curve = [{"pruned": 0, "held_out_ba": base_ba, "held_out_asr": base_asr}]
        chosen = 0
        for k in range(1, limit + 1):
            with torch.no_grad():
                lin.weight.copy_(original)
            mask_linear_inputs(model, order[:k])
            ba = pool_accuracy(model, pool["x_val"], pool["y_val"], device)
            asr = pool_asr(model, pool["x_val"], pool["y_val"], trigger, device)
            curve.append({"pruned": k, "held_out_ba": ba, "held_out_asr": asr})
            progress(k / max(limit, 1), f"pruning {k}/{limit} channels", {"held_out_asr": asr, "held_out_ba": ba})
            if base_ba - ba > params.ba_tolerance:
                break
            chosen = k
            if asr is not None and asr <= params.target_asr:
                break
        with torch.no_grad():
            lin.weight.copy_(original)
        mask_linear_inputs(model, order[:chosen])
        return DefenseOutput(model, {
            "layer": last_feature_layer(model),
            "pruned_channels": order[:chosen],
            "n_pruned": chosen,
            "n_channels": n_ch,
            "top_scores": [round(float(score[c]), 4) for c in order[:10]],
            "score": f"E||A_k(x+trigger)||_{params.norm} - E||A_k(x)||_{params.norm}",
        }, {"prune_curve": curve})
