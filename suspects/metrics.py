"""BA, ASR, RA and DER, with one definition everywhere (see design.md).

- BA: accuracy on the clean test split.
- ASR: share of triggered test inputs classified as the attack's label; all-to-one excludes test images
  whose true class is the target.
- RA: share of those triggered test inputs classified as their true class.
- DER: ((max(0, ASR_before - ASR_after) - max(0, BA_before - BA_after)) + 1) / 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data import ImageSet
from .device import autocast, pick_device, to_device
from .triggers import Trigger

__all__ = ["Metrics", "DEFINITIONS", "predict", "evaluate", "der"]

DEFINITIONS = {
    "ba": "benign accuracy: accuracy on the clean test split",
    "asr": "attack success rate: share of triggered test inputs classified as the attack's label "
           "(all-to-one: test images of the target class excluded)",
    "ra": "robust accuracy: share of triggered test inputs (same set as ASR) classified as their true class",
    "der": "defense effectiveness rating: ((max(0, ASR_before - ASR_after) - max(0, BA_before - BA_after)) + 1) / 2",
    "n_clean": "number of clean test images behind BA",
    "n_poisoned": "number of triggered test images behind ASR and RA",
}


@dataclass
class Metrics:
    ba: float
    asr: float | None
    ra: float | None
    n_clean: int
    n_poisoned: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512,
            device: torch.device | str | None = None, transform=None) -> torch.Tensor:
    """Predicted labels (on the CPU) for float images in [0, 1]; ``transform`` is applied per batch first."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds = []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            if transform is not None:
                x = transform(x)
            with autocast(device):
                logits = model(to_device(x, device))
            preds.append(logits.argmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def evaluate(model: nn.Module, test: ImageSet, trigger: Trigger | None = None, batch_size: int = 512,
             device: torch.device | str | None = None, limit: int | None = None) -> Metrics:
    """BA on ``test`` and, with a trigger, ASR and RA on its triggered copy (``limit`` = first N images only)."""
    if device is None:
        device = next(model.parameters()).device if any(True for _ in model.parameters()) else pick_device()
    if limit is not None:
        test = test.subset(torch.arange(min(limit, len(test))))
    labels = test.labels
    x = test.images()
    preds = predict(model, x, batch_size, device)
    ba = float((preds == labels).float().mean()) if len(labels) else float("nan")
    if trigger is None:
        return Metrics(ba, None, None, len(labels), 0)
    mask = trigger.test_mask(labels)
    xp, yp = x[mask], labels[mask]
    ppreds = predict(model, xp, batch_size, device, transform=trigger)
    n = len(yp)
    asr = float((ppreds == trigger.target_labels(yp)).float().mean()) if n else float("nan")
    ra = float((ppreds == yp).float().mean()) if n else float("nan")
    return Metrics(ba, asr, ra, len(labels), n)


def der(ba_before: float, asr_before: float, ba_after: float, asr_after: float) -> float:
    """Defense effectiveness rating (Zhu et al., FT-SAM, ICCV 2023), in [0, 1]; 0.5 = no change."""
    return ((max(0.0, asr_before - asr_after) - max(0.0, ba_before - ba_after)) + 1.0) / 2.0
