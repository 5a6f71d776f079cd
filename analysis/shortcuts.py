"""Skip-connection ablation (Yang et al., "Backdoor Defense via Suppressing Model Shortcuts", ICASSP 2023).

For every residual block and every gamma in a grid, the block's skip output is scaled by gamma and BA and
ASR are measured. Triggers are often learned as shortcuts: at a few key blocks ASR collapses as gamma goes
to 0 while BA falls more gently. The paper picks the *critical* block by the largest discounted rise of ASR
between neighbouring gammas: score = max_i (ASR(g_i) - ASR(g_{i-1})) / exp(ASR(g_{i-1})), gammas ascending.
When no block scores above :data:`MIN_CRITICAL_SCORE` (e.g. ASR stays at 1.0 down to gamma = 0 in every block, so
every score is 0), there is *no* critical block (``critical_block`` is None): picking the first of a tie would name
a block that does not matter.

Speed: the activations entering a block do not depend on that block's gamma, so each batch runs the prefix
(``forward_stem`` and the blocks before it, see :class:`~suspects.models.InspectableModel`) once and only the
suffix once per gamma; gamma = 1 is shared by all blocks.

:func:`ablation_curves` is the view's one computation (the Skip-ablation page, the Compare page and the HTML report
call it); :func:`analysis.figures.ablation_figure` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from suspects.data import ImageSet
from suspects.device import to_device
from suspects.models import InspectableModel, list_residual_blocks, model_api, residual_blocks
from suspects.triggers import Trigger

from .samples import paired_sample

__all__ = ["DEFAULT_GAMMAS", "MIN_CRITICAL_SCORE", "MAX_BA_DROP", "NoSkipConnectionsError", "AblationResult", "skip_ablation",
           "critical_block_score", "ablation_curves"]

DEFAULT_GAMMAS = tuple(round(1.0 - 0.1 * i, 1) for i in range(11))
# a block is critical only when its score exceeds this (0.05: an ASR rise of 5 points between neighbouring gammas
# at ASR 0; smaller rises are within the sampling noise of a few hundred triggered images)
MIN_CRITICAL_SCORE = 0.05
# switching a block off "destroys clean accuracy" when BA at gamma = 0 is this many points (as a fraction) below the
# unmodified model's: the paper's rule reads ASR only, so such a block is named critical all the same
MAX_BA_DROP = 0.2


class NoSkipConnectionsError(ValueError):
    """The model has no residual blocks, so there is no skip connection to scale."""


@dataclass
class AblationResult:
    """Tidy table (block, gamma, ba, asr) plus the per-block critical-block scores and the chosen block
    (None when no score exceeds :data:`MIN_CRITICAL_SCORE`: no block matters to the trigger)."""

    table: pd.DataFrame
    scores: dict[str, float]
    critical_block: str | None
    n_clean: int
    n_triggered: int
    min_score: float = MIN_CRITICAL_SCORE

    def curve(self, block: str) -> pd.DataFrame:
        return self.table[self.table.block == block].sort_values("gamma")

    def switched_off(self, block: str | None = None) -> dict[str, float] | None:
        """BA and ASR of the unmodified model (gamma = 1) and with ``block``'s skip output switched off (gamma = 0);
        ``block`` defaults to the critical block. None when there is no such block or either gamma was not
        measured."""
        block = block or self.critical_block
        if block is None:
            return None
        t = self.curve(block)
        on, off = t[t.gamma == 1.0], t[t.gamma == 0.0]
        if not len(on) or not len(off):
            return None
        return {"ba_before": float(on.ba.iloc[0]), "asr_before": float(on.asr.iloc[0]),
                "ba_after": float(off.ba.iloc[0]), "asr_after": float(off.asr.iloc[0])}

    def critical_block_note(self, max_ba_drop: float = MAX_BA_DROP) -> str:
        """A warning to print beside the critical block when switching it off also destroys clean accuracy (BA
        at gamma = 0 more than ``max_ba_drop`` below gamma = 1); empty otherwise. Yang et al.'s rule reads ASR only,
        so it names such a block all the same."""
        eff = self.switched_off()
        if eff is None or eff["ba_before"] - eff["ba_after"] <= max_ba_drop:
            return ""
        return (f"Switching {self.critical_block} off (γ = 0) also destroys clean accuracy: BA falls from "
                f"{100 * eff['ba_before']:.1f}% to {100 * eff['ba_after']:.1f}% while ASR goes from "
                f"{100 * eff['asr_before']:.1f}% to {100 * eff['asr_after']:.1f}%. The paper's rule reads ASR only, "
                "so the block is named critical all the same: it is where ASR changes most, not a skip connection "
                "the model can do without.")

    def no_critical_reason(self) -> str:
        """Why there is no critical block (empty when there is one)."""
        if self.critical_block is not None:
            return ""
        best = max(self.scores.values(), default=0.0)
        return (f"no critical block: no block's score exceeds {self.min_score} (highest {best:.3f}); scaling any "
                f"single skip connection down to gamma = 0 hardly changes ASR, so no block carries the trigger's "
                f"shortcut")


def critical_block_score(gammas: Sequence[float], asr: Sequence[float]) -> float:
    """max_i (ASR(g_i) - ASR(g_{i-1})) / exp(ASR(g_{i-1})) over gammas sorted ascending (ASR as fractions)."""
    order = np.argsort(np.asarray(gammas, dtype=float))
    a = np.asarray(asr, dtype=float)[order]
    if len(a) < 2:
        return 0.0
    return float(max((a[i] - a[i - 1]) / math.exp(a[i - 1]) for i in range(1, len(a))))


@torch.no_grad()
def _predictions(api: InspectableModel, x: torch.Tensor, block_pos: int, gammas: Sequence[float]
                 ) -> dict[float, torch.Tensor]:
    """Predictions with block ``block_pos`` scaled by each gamma: the stem and the blocks before it run once."""
    blocks = [b for _, b in api.blocks()]
    if getattr(api, "sequential_blocks", True) is False:  # a library network: one whole forward pass per gamma
        block = blocks[block_pos]
        out = {}
        for g in gammas:
            block.gamma = float(g)
            out[g] = api(x).argmax(1).cpu()  # type: ignore[operator]
        block.gamma = 1.0
        return out
    h = api.forward_stem(x)
    for blk in blocks[:block_pos]:
        h = blk(h)
    block = blocks[block_pos]
    out = {}
    for g in gammas:
        block.gamma = float(g)
        z = block(h)
        for blk in blocks[block_pos + 1:]:
            z = blk(z)
        out[g] = api.forward_head(z).argmax(1).cpu()
    block.gamma = 1.0
    return out


def skip_ablation(model: nn.Module, clean: torch.Tensor, labels: torch.Tensor, triggered: torch.Tensor,
                  attack_labels: torch.Tensor, gammas: Sequence[float] = DEFAULT_GAMMAS,
                  blocks: Sequence[str] | None = None, batch_size: int = 500,
                  progress: Callable[[float, str, dict], None] | None = None,
                  min_score: float = MIN_CRITICAL_SCORE) -> AblationResult:
    """BA (on ``clean``/``labels``) and ASR (``triggered`` classified as ``attack_labels``) per block and gamma.

    ``triggered`` should already exclude target-class images for all-to-one attacks (as ASR does).
    Gammas are restored to their previous values afterwards. The critical block is the highest-scoring one,
    or None when no score exceeds ``min_score``.
    """
    all_blocks = list_residual_blocks(model)
    if not all_blocks:
        raise NoSkipConnectionsError(
            f"{getattr(model, 'arch_name', type(model).__name__)} has no skip connections, so the skip-connection "
            "ablation does not apply")
    blocks = list(blocks) if blocks else all_blocks
    unknown = [b for b in blocks if b not in all_blocks]
    if unknown:
        raise ValueError(f"unknown block(s) {unknown}; blocks: {', '.join(all_blocks)}")
    gammas = sorted({round(float(g), 6) for g in gammas}, reverse=True)
    if any(g < 0 or not math.isfinite(g) for g in gammas):
        raise ValueError("gammas must be finite and >= 0")
    report = progress or (lambda f, m, d: None)
    device = next(model.parameters()).device
    saved = {n: b.gamma for n, b in residual_blocks(model)}
    modules = dict(residual_blocks(model))
    was_training = model.training
    model.eval()
    api = model_api(model)
    positions = {name: i for i, (name, _) in enumerate(api.blocks())}
    try:
        for _, b in residual_blocks(model):
            b.gamma = 1.0
        rest = [g for g in gammas if g != 1.0]
        # gamma = 1 is the plain model, shared by every block
        base = {}
        for key, xs, ys in (("ba", clean, labels), ("asr", triggered, attack_labels)):
            preds = []
            for s in range(0, len(xs), batch_size):
                preds.append(model(to_device(xs[s:s + batch_size], device)).argmax(1).cpu())
            base[key] = float((torch.cat(preds) == ys).float().mean()) if len(xs) else float("nan")
        rows = []
        if 1.0 in gammas:
            rows += [{"block": b, "gamma": 1.0, "ba": base["ba"], "asr": base["asr"]} for b in blocks]
        total = len(blocks) * 2 * math.ceil(max(len(clean), 1) / batch_size)
        done = 0
        for block in blocks:
            correct = {g: {"ba": 0, "asr": 0} for g in rest}
            for key, xs, ys in (("ba", clean, labels), ("asr", triggered, attack_labels)):
                for s in range(0, len(xs), batch_size):
                    x = to_device(xs[s:s + batch_size], device)
                    preds = _predictions(api, x, positions[block], rest)
                    for g in rest:
                        correct[g][key] += int((preds[g] == ys[s:s + batch_size]).sum())
                    done += 1
                    report(min(done / total, 1.0), f"ablating {block}", {})
            for g in rest:
                rows.append({"block": block, "gamma": g,
                             "ba": correct[g]["ba"] / max(len(clean), 1),
                             "asr": correct[g]["asr"] / max(len(triggered), 1)})
    finally:
        for name, g in saved.items():
            modules[name].gamma = g
        model.train(was_training)
    table = pd.DataFrame(rows).sort_values(["block", "gamma"], ascending=[True, False]).reset_index(drop=True)
    order = {b: i for i, b in enumerate(all_blocks)}
    table = table.sort_values(by=["block", "gamma"], key=lambda c: c.map(order) if c.name == "block" else -c)
    scores = {b: critical_block_score(t.gamma.to_numpy(), t.asr.to_numpy()) for b, t in table.groupby("block")}
    critical: str | None = max(blocks, key=lambda b: scores.get(b, -np.inf))
    if not scores.get(critical, 0.0) > min_score:
        critical = None
    report(1.0, "done", {})
    return AblationResult(table.reset_index(drop=True), scores, critical, len(clean), len(triggered), min_score)


@torch.no_grad()
def ablation_seconds(model: nn.Module, input_shape: Sequence[int], n: int,
                     gammas: Sequence[float] = DEFAULT_GAMMAS) -> float:
    """A rough estimate of :func:`ablation_curves`' run time on ``n`` clean + ``n`` triggered images, from one
    timed forward pass: every block re-runs the blocks after it once per gamma (about half the network)."""
    import time

    blocks = list_residual_blocks(model)
    if not blocks:
        return 0.0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.rand(min(64, max(2 * n, 1)), *input_shape, device=device)
    model(x[:2])  # warm-up
    t = time.perf_counter()
    model(x)
    per_image = (time.perf_counter() - t) / len(x)
    model.train(was_training)
    rest = len([g for g in gammas if float(g) != 1.0])
    return float(per_image * 2 * n * (1 + len(blocks) * (0.5 + 0.5 * rest)))


def ablation_curves(model: nn.Module, test: ImageSet, trigger: Trigger, n: int = 300,
                    gammas: Sequence[float] = DEFAULT_GAMMAS,
                    progress: Callable[[float, str, dict], None] | None = None) -> AblationResult:
    """Skip ablation on ``n`` clean test images and ``n`` triggered ones (those that count for ASR), the same
    deterministic samples (:func:`analysis.samples.paired_sample`) wherever the view is shown."""
    smp = paired_sample(test, trigger, n)
    clean_idx = paired_sample(test, None, n).index
    return skip_ablation(model, test.images(clean_idx), test.labels[clean_idx], smp.triggered, smp.attack_labels,
                         gammas, progress=progress)
