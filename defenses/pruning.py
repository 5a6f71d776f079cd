"""Ranked channel pruning of the last feature layer: what Fine-Pruning and l_inf pruning share.

Both rank the channels of the last feature layer, then prune them in that order (the classifier's input columns
are zeroed, exact for average-pooled features), trying ever more channels while a rule on the held-out part of
the defense pool allows, and keep the last count it accepted. A subclass says how channels are ranked
(:meth:`RankedPruning.rank_channels`) and sets its rule through the small hooks below; the search, the progress
reports, the prune curve and the common artifacts are here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Defense, DefenseOutput
from .common import head, last_feature_layer, mask_linear_inputs, pool_accuracy
from .context import RepairContext

__all__ = ["RankedPruning"]


class RankedPruning(Defense):
    """Base class of the last-layer pruning defenses; its ``Params`` need a ``max_ratio`` (largest pruned share)."""

    prune_share: ClassVar[float] = 1.0  # share of the defense's progress taken by the pruning search
    sort_pruned: ClassVar[bool] = False  # report the pruned channels sorted (else in rank order)

    def rank_channels(self, model: nn.Module, params: Any, ctx: RepairContext) -> tuple[list[int], dict[str, Any]]:
        """All channel indices of the last feature layer, the first to prune first, and artifacts of the ranking."""
        raise NotImplementedError

    def step_size(self, n_channels: int, params: Any) -> int:
        """How many more channels each step of the search prunes."""
        return 1

    def measure(self, model: nn.Module, ctx: RepairContext) -> dict[str, float | None]:
        """What the rule looks at, on the held-out pool (never the test split); also a row of the prune curve."""
        return {"held_out_ba": pool_accuracy(model, ctx.pool.x_val, ctx.pool.y_val, ctx.device)}

    def tolerated(self, base: dict[str, Any], now: dict[str, Any], params: Any) -> bool:
        """Whether the pruned model (``now``) is still acceptable against the unpruned one (``base``)."""
        raise NotImplementedError

    def enough(self, now: dict[str, Any], params: Any) -> bool:
        """Stop at this (accepted) count: pruning more is not needed."""
        return False

    def give_up(self, now: dict[str, Any], k: int, n_channels: int, params: Any) -> str | None:
        """Why the search stops here and the defense reports failure (the model is returned unpruned), or None to
        go on. Called after each accepted count that was not :meth:`enough`."""
        return None

    def after_pruning(self, model: nn.Module, params: Any, ctx: RepairContext,
                      reapply: Callable[[], None]) -> dict[str, Any]:
        """Work after the channels are pruned (``reapply`` re-zeroes them, e.g. after fine-tuning steps)."""
        return {}

    def repair(self, model: nn.Module, params: Any, ctx: RepairContext) -> DefenseOutput:
        order, ranking = self.rank_channels(model, params, ctx)
        n_ch = len(order)
        limit = int(params.max_ratio * n_ch)
        step = self.step_size(n_ch, params)
        lin = head(model)
        original = lin.weight.detach().clone()
        base = self.measure(model, ctx)
        curve = [{"pruned": 0, **base}]
        kept = 0
        failure: str | None = None
        for k in range(step, limit + 1, step):
            with torch.no_grad():
                lin.weight.copy_(original)
            mask_linear_inputs(model, order[:k])
            now = self.measure(model, ctx)
            curve.append({"pruned": k, **now})
            ctx.tick(self.prune_share * k / max(limit, 1), f"pruning {k}/{n_ch} channels", now)
            if not self.tolerated(base, now, params):
                break
            kept = k
            if self.enough(now, params):
                break
            failure = self.give_up(now, k, n_ch, params)
            if failure is not None:
                kept = 0
                break
        with torch.no_grad():
            lin.weight.copy_(original)
        reapply = mask_linear_inputs(model, order[:kept])
        extra = self.after_pruning(model, params, ctx, reapply)
        pruned = sorted(order[:kept]) if self.sort_pruned else order[:kept]
        artifacts = {"layer": last_feature_layer(model), "pruned_channels": pruned, "n_pruned": kept,
                     "n_channels": n_ch, "failed": failure is not None, **ranking, **extra}
        if failure is not None:
            artifacts["reason"] = failure
        return DefenseOutput(model, artifacts, {"prune_curve": curve})
