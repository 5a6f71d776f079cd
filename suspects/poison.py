"""The poisoned training set: a clean :class:`ImageSet` plus a trigger and a deterministic plan."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .data import ImageSet
from .triggers import PoisonPlan, Trigger

__all__ = ["PoisonedDataset"]


class PoisonedDataset(Dataset):
    """Yields ``(image, label, original_label, poisoned)`` with images in [0, 1].

    ``poison_idx`` are the indices that carry the trigger (label changed by the trigger's rule unless
    the attack is clean-label); ``noise_idx`` (WaNet's noise mode) get a random warp and keep their label.
    Indices in ``exclude`` (the defense pool) are never touched.
    """

    def __init__(self, base: ImageSet, trigger: Trigger | None, rate: float = 0.1, seed: int = 0,
                 exclude: torch.Tensor | None = None, plan: PoisonPlan | None = None):
        self.base = base
        self.trigger = trigger
        self.seed = int(seed)
        if trigger is None:
            empty = torch.empty(0, dtype=torch.long)
            plan = PoisonPlan(empty, empty)
        elif plan is None:
            plan = trigger.plan(base.labels, rate, seed, exclude)
        self.plan = plan
        self.poisoned_mask = torch.zeros(len(base), dtype=torch.bool)
        self.poisoned_mask[plan.poison_idx] = True
        self.noise_mask = torch.zeros(len(base), dtype=torch.bool)
        self.noise_mask[plan.noise_idx] = True
        self.labels = base.labels.clone()
        if trigger is not None and len(plan.poison_idx) and not trigger.clean_label:
            self.labels[plan.poison_idx] = trigger.target_labels(base.labels[plan.poison_idx])

    @property
    def poison_idx(self) -> torch.Tensor:
        return self.plan.poison_idx

    def __len__(self) -> int:
        return len(self.base)

    def _noise_seed(self, i: int) -> int:
        return self.seed * 1_000_003 + int(i)

    def __getitem__(self, i: int):
        x = self.base.images([i])
        if self.poisoned_mask[i]:
            x = self.trigger(x)
        elif self.noise_mask[i]:
            x = self.trigger.apply_noise(x, [self._noise_seed(i)]).clamp(0, 1)
        return x[0], int(self.labels[i]), int(self.base.labels[i]), bool(self.poisoned_mask[i])

    def materialize(self, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All images as one float tensor, with training labels and the poisoned flags (fast training path)."""
        x = self.base.images()
        if self.trigger is not None:
            for idx in (self.plan.poison_idx, ):
                for start in range(0, len(idx), batch_size):
                    chunk = idx[start:start + batch_size]
                    x[chunk] = self.trigger(x[chunk])
            noise = self.plan.noise_idx
            for start in range(0, len(noise), batch_size):
                chunk = noise[start:start + batch_size]
                x[chunk] = self.trigger.apply_noise(x[chunk], [self._noise_seed(i) for i in chunk]).clamp(0, 1)
        return x, self.labels.clone(), self.poisoned_mask.clone()
