"""Shared parts of the training-time defenses (DBD, CBD): the poisoned training set, fresh weights, progress.

Training-time defenses retrain a model from the suspect's *poisoned training set* (known for the demo suspects
and anything trained with ``backdoor-lens train``). The held-out part of the defense pool is removed from that
set, so the live BA / ASR they report on it (``pool.x_val``) stays held out; the test split is never seen.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import autocast, to_device
from suspects.models import penultimate_features, reset_skip_gammas
from suspects.store import Suspect
from suspects.triggers import Trigger

from .common import triggerable
from .context import DefensePool, RepairContext

__all__ = ["TrainingSet", "poisoned_training_set", "reinitialize", "StageClock", "batched_features",
           "knn_monitor", "suspect_fingerprint", "histogram", "auroc", "split_quality"]


@dataclass
class TrainingSet:
    """The poisoned training images in [0, 1] with their (possibly poisoned) labels and the known plan."""

    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor  # bool, carries the trigger (from the suspect's poison plan)
    index: torch.Tensor  # indices into the suspect's training split

    def __len__(self) -> int:
        return len(self.y)

    @property
    def poison_rate(self) -> float:
        return float(self.poisoned.float().mean()) if len(self.y) else 0.0


def poisoned_training_set(suspect: Suspect, pool: DefensePool, subset: int = 0, seed: int = 0) -> TrainingSet:
    """The suspect's poisoned training set minus the held-out pool images (minus the whole pool when the suspect was
    trained without it); ``subset`` > 0 keeps a random subset."""
    data = suspect.poisoned_train()
    x, y, poisoned = data.materialize()
    keep = torch.ones(len(y), dtype=torch.bool)
    if not suspect.pool_in_training:
        keep[suspect.split[1]] = False
    n_val = pool.n_held_out
    if n_val and len(pool.index):
        held_out = suspect.split[1][pool.index[:n_val]]
        keep[held_out] = False
    index = torch.nonzero(keep).flatten()
    if subset and subset < len(index):
        gen = torch.Generator().manual_seed(int(seed) + 101)
        index = index[torch.randperm(len(index), generator=gen)[:subset]].sort().values
    return TrainingSet(x[index], y[index], poisoned[index], index)


def reinitialize(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Fresh weights in place (every module's ``reset_parameters``, BN statistics included); skip scales to 1."""
    if seed is not None:
        torch.manual_seed(seed)
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    reset_skip_gammas(model)
    return model


def suspect_fingerprint(suspect: Suspect) -> str:
    """A hash of what determines the poisoned training set and the architecture (to refuse a foreign backbone)."""
    card = suspect.card
    keys = ("arch", "arch_kwargs", "classes", "input_shape", "data", "trigger", "poison")
    blob = json.dumps({k: card.get(k) for k in keys}, sort_keys=True, default=str)
    if suspect._plan is not None:
        blob += ",".join(map(str, suspect._plan.poison_idx.tolist()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageClock:
    """One progress fraction over the stages of a defense, with cancellation checked at every step.

    ``costs`` are the relative amounts of work of the stages (any unit); :meth:`tick` adds work done in
    ``stage`` and reports it through ``ctx.tick`` (at most every ``interval`` seconds unless ``metrics`` are
    given); in between it only checks for cancellation (``ctx.check_cancel``).
    """

    def __init__(self, ctx: RepairContext, costs: dict[str, float], interval: float = 0.5):
        self.ctx = ctx
        total = sum(costs.values()) or 1.0
        self.start, acc = {}, 0.0
        for name, c in costs.items():
            self.start[name] = acc / total
            acc += c
        self.share = {name: c / total for name, c in costs.items()}
        self.interval, self.last = interval, 0.0

    def tick(self, stage: str, fraction: float, message: str, metrics: dict | None = None) -> None:
        """``fraction`` of ``stage`` is done; raise :class:`~defenses.context.Cancelled` when the user asked to stop."""
        now = time.time()
        if metrics or now - self.last >= self.interval:
            self.last = now
            overall = self.start[stage] + self.share[stage] * min(max(fraction, 0.0), 1.0)
            self.ctx.tick(overall, message, metrics)
        else:
            self.ctx.check_cancel()


@torch.no_grad()
def batched_features(model: nn.Module, x: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (eval mode) of ``x``, on the CPU in float32."""
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(x), batch_size):
            with autocast(device):
                out.append(penultimate_features(model, to_device(x[s:s + batch_size], device)).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def knn_monitor(model: nn.Module, pool: DefensePool, trigger: Trigger | None, device,
                k: int = 10) -> Callable[[], dict]:
    """Held-out pool BA / ASR of a cosine k-NN on the current features (for stages without a classifier head).

    The reference set is the pool's training part; queries are the held-out part, clean and triggered.
    """
    def measure() -> dict:
        if pool.n_held_out == 0 or pool.n_train == 0:
            return {}
        ref = F.normalize(batched_features(model, pool.x, device), dim=1)
        num_classes = int(max(pool.y.max(), pool.y_val.max())) + 1

        def classify(x: torch.Tensor) -> torch.Tensor:
            q = F.normalize(batched_features(model, x, device), dim=1)
            sim, nn_idx = (q @ ref.T).topk(min(k, len(ref)), dim=1)
            votes = torch.zeros(len(q), num_classes)
            votes.scatter_add_(1, pool.y[nn_idx], (sim / 0.1).exp())
            return votes.argmax(1)

        out = {"knn_ba": float((classify(pool.x_val) == pool.y_val).float().mean())}
        if trigger is not None:
            mask = triggerable(trigger, pool.x_val, pool.y_val)
            if mask.any():
                xt = trigger(pool.x_val[mask])
                out["knn_asr"] = float((classify(xt) == trigger.target_labels(pool.y_val[mask])).float().mean())
        return out
    return measure


def histogram(values: torch.Tensor, edges: torch.Tensor) -> list[float]:
    """Share of ``values`` in each bin of ``edges`` (values outside are clipped into the end bins)."""
    if len(values) == 0:
        return [0.0] * (len(edges) - 1)
    v = values.float().clamp(float(edges[0]), float(edges[-1]))
    idx = (torch.bucketize(v, edges, right=True) - 1).clamp(0, len(edges) - 2)
    counts = torch.bincount(idx, minlength=len(edges) - 1).float()
    return (counts / len(values)).tolist()


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` separating ``positive`` from the rest (ties count half)."""
    pos, neg = scores[positive].float(), scores[~positive].float()
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = scores.float().argsort()
    _, inverse, counts = torch.unique_consecutive(scores.float()[order], return_inverse=True, return_counts=True)
    mid_rank = counts.cumsum(0).float() - (counts.float() - 1) / 2  # ties share their average rank
    ranks = torch.empty(len(scores))
    ranks[order] = mid_rank[inverse]
    return float((ranks[positive].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def split_quality(dropped: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """Precision and recall of the samples that lose their labels (``dropped``) against the poisoned ones."""
    tp = int((dropped & poisoned).sum())
    n_drop, n_pois = int(dropped.sum()), int(poisoned.sum())
    return {"precision": tp / n_drop if n_drop else 0.0, "recall": tp / n_pois if n_pois else float("nan"),
            "poisoned_kept": n_pois - tp, "dropped": n_drop}
