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
    the attack is clean-label; :meth:`Trigger.apply_train` makes their copies); ``noise_idx`` keep their label and get
    :meth:`Trigger.apply_noise` (WaNet's noise warps, BppAttack's negatives, the adaptive attacks' cover samples).
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

    def _partners(self, seeds: list[int]) -> torch.Tensor:
        """One other training image per seed (BppAttack's negatives add its quantisation residual), drawn per seed."""
        n = len(self.base)
        idx = [int(torch.randint(0, n, (1,), generator=torch.Generator().manual_seed(s + 7))) for s in seeds]
        return self.base.images(idx)

    def _noise(self, x: torch.Tensor, idx) -> torch.Tensor:
        seeds = [self._noise_seed(int(i)) for i in idx]
        if getattr(self.trigger, "noise_partners", False):
            return self.trigger.apply_noise(x, seeds, partners=self._partners(seeds)).clamp(0, 1)
        return self.trigger.apply_noise(x, seeds).clamp(0, 1)

    def _poison(self, x: torch.Tensor, idx) -> torch.Tensor:
        return self.trigger.apply_train(x, [self._noise_seed(int(i)) for i in idx]).clamp(0, 1)

    def __getitem__(self, i: int):
        x = self.base.images([i])
        if self.poisoned_mask[i]:
            x = self._poison(x, [i])
        elif self.noise_mask[i]:
            x = self._noise(x, [i])
        return x[0], int(self.labels[i]), int(self.base.labels[i]), bool(self.poisoned_mask[i])

    def materialize(self, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All images as one float tensor, with training labels and the poisoned flags (fast training path)."""
        x = self.base.images()
        if self.trigger is not None:
            poison = self.plan.poison_idx
            for start in range(0, len(poison), batch_size):
                chunk = poison[start:start + batch_size]
                x[chunk] = self._poison(x[chunk], chunk)
            noise = self.plan.noise_idx
            for start in range(0, len(noise), batch_size):
                chunk = noise[start:start + batch_size]
                x[chunk] = self._noise(x[chunk], chunk)
        return x, self.labels.clone(), self.poisoned_mask.clone()
