"""Deterministic samples of clean test images and their triggered copies, shared by every view."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from suspects.data import ImageSet
from suspects.triggers import Trigger

__all__ = ["PairedSample", "paired_sample", "balanced_indices"]


@dataclass
class PairedSample:
    """``n`` clean test images, their labels and indices, and (with a trigger) their triggered copies."""

    index: torch.Tensor
    clean: torch.Tensor
    labels: torch.Tensor
    triggered: torch.Tensor | None
    attack_labels: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.index)


def balanced_indices(labels: torch.Tensor, n: int, seed: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Up to ``n`` indices spread evenly over the classes (round-robin over shuffled per-class lists)."""
    labels = torch.as_tensor(labels)
    allowed = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask
    gen = torch.Generator().manual_seed(int(seed))
    pools = []
    for c in labels[allowed].unique().tolist():
        idx = torch.nonzero(allowed & (labels == c)).flatten()
        pools.append(idx[torch.randperm(len(idx), generator=gen)].tolist())
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(p) for p in pools):
        for p in pools:
            if depth < len(p) and len(out) < n:
                out.append(p[depth])
        depth += 1
    return torch.tensor(sorted(out), dtype=torch.long)


def paired_sample(test: ImageSet, trigger: Trigger | None, n: int, seed: int = 0) -> PairedSample:
    """Clean test images that count for ASR (all-to-one: not of the target class) and their triggered copies."""
    if n < 1:
        raise ValueError(f"sample size must be >= 1, got {n}")
    mask = trigger.test_mask(test.labels) if trigger is not None else None
    idx = balanced_indices(test.labels, n, seed, mask)
    x = test.images(idx)
    labels = test.labels[idx]
    if trigger is None:
        return PairedSample(idx, x, labels, None, None)
    return PairedSample(idx, x, labels, trigger(x), trigger.target_labels(labels))
