"""BA, ASR, RA and DER, with one definition everywhere (see design.md).

- BA: accuracy on the clean test split.
- ASR: share of triggered test inputs classified as the attack's label; all-to-one excludes test images
  whose true class is the target; all-to-all counts every test image, class y succeeding at (y + 1) mod K.
- RA: share of those triggered test inputs classified as their true class.
- DER: ((max(0, ASR_before - ASR_after) - max(0, BA_before - BA_after)) + 1) / 2.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .data import ImageSet
from .device import autocast, pick_device, to_device
from .triggers import Trigger

__all__ = ["Metrics", "DEFINITIONS", "metric_definitions", "asr_rule",
           "predict", "evaluate", "der", "wilson_interval", "model_fingerprint",
           "data_fingerprint", "stamp_metrics", "stored_metrics", "evaluate_subset"]

_ASR = "attack success rate: share of triggered test inputs classified as the attack's label"
_RA = "robust accuracy: share of triggered test inputs ({}) classified as their true class"
_ALL_TO_ONE_RULE = "all-to-one: test images of the target class excluded"
_ALL_TO_ALL_RULE = ("all-to-all: a triggered image of class y counts as a success when classified as (y + 1) mod K{}; "
                    "every test image counts")


def asr_rule(trigger: Trigger | Mapping[str, Any] | None = None, num_classes: int | None = None) -> str:
    """Which triggered test images count for ASR / RA and what a success is, for ``trigger``'s label mapping.

    ``trigger``: a :class:`Trigger`, its spec dict, or None (unknown: both rules are stated). ``num_classes``
    fills in K for a spec dict (a Trigger knows its own). The rule is :meth:`Trigger.test_mask` /
    :meth:`Trigger.target_labels` in words.
    """
    if trigger is None:
        return f"{_ALL_TO_ONE_RULE}; {_ALL_TO_ALL_RULE.format('')}"
    mapping = trigger.get("mapping", "all-to-one") if isinstance(trigger, Mapping) else trigger.mapping
    if mapping != "all-to-all":
        return _ALL_TO_ONE_RULE
    k = num_classes if isinstance(trigger, Mapping) else getattr(trigger, "num_classes", num_classes)
    return _ALL_TO_ALL_RULE.format(f" with K = {int(k)}" if k else "")


def metric_definitions(trigger: Trigger | Mapping[str, Any] | None = None,
                       num_classes: int | None = None) -> dict[str, str]:
    """BA / ASR / RA / DER definitions, with the ASR / RA image set stated for ``trigger``'s mapping
    (see :func:`asr_rule`; None: a trigger not known, both mappings stated)."""
    all_to_all = trigger is not None and (trigger.get("mapping") if isinstance(trigger, Mapping)
                                          else trigger.mapping) == "all-to-all"
    return {
        "ba": "benign accuracy: accuracy on the clean test split",
        "asr": f"{_ASR} ({asr_rule(trigger, num_classes)})",
        "ra": _RA.format("same set as ASR: every test image" if all_to_all else "same set as ASR"),
        "der": "defense effectiveness rating: ((max(0, ASR_before - ASR_after) - max(0, BA_before - BA_after)) + 1) / 2",
        "n_clean": "number of clean test images behind BA",
        "n_poisoned": "number of triggered test images behind ASR and RA",
    }


DEFINITIONS = metric_definitions(None)  # the mapping not known: both rules; a suspect's pages use metric_definitions


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


def wilson_interval(p: float | None, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval (Wilson, JASA 1927) of a proportion ``p`` measured on ``n`` samples; 95% by default.
    None without a measurement."""
    if p is None or n <= 0 or math.isnan(p):
        return None
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and values; memory format does not matter): the
    identity of the weights that stored metrics belong to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def data_fingerprint(test: ImageSet, trigger: Trigger | None) -> str:
    """SHA-256 of the test split (pixels and labels) and the trigger's specification: what metrics were measured on."""
    h = hashlib.sha256()
    h.update(test.pixels.contiguous().numpy().tobytes())
    h.update(test.labels.contiguous().numpy().tobytes())
    spec: Any = trigger.spec() if trigger is not None and hasattr(trigger, "spec") else None
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def stamp_metrics(metrics: Metrics, model: nn.Module, test: ImageSet, trigger: Trigger | None,
                  evaluated_on: str = "test split") -> dict[str, Any]:
    """The card's ``metrics`` entry: the metrics with the fingerprints of the weights and data they were measured
    on, so a later run on the same weights and data can reuse them (:func:`stored_metrics`)."""
    return {**metrics.to_dict(), "evaluated_on": evaluated_on, "model_fingerprint": model_fingerprint(model),
            "data_fingerprint": data_fingerprint(test, trigger)}


def stored_metrics(card: dict[str, Any], model: nn.Module, test: ImageSet, trigger: Trigger | None) -> Metrics | None:
    """The card's metrics when they were measured on exactly these weights and this test split and trigger (both
    fingerprints match); else None, and the caller measures."""
    m = card.get("metrics") or {}
    if not m.get("model_fingerprint") or not m.get("data_fingerprint") or m.get("ba") is None:
        return None
    if (trigger is None) != (m.get("asr") is None):
        return None
    if m["data_fingerprint"] != data_fingerprint(test, trigger) or m["model_fingerprint"] != model_fingerprint(model):
        return None
    if int(m.get("n_clean", -1)) != len(test):
        return None
    return Metrics(float(m["ba"]), None if m.get("asr") is None else float(m["asr"]),
                   None if m.get("ra") is None else float(m["ra"]), int(m["n_clean"]), int(m.get("n_poisoned", 0)))


def evaluate_subset(model: nn.Module, test: ImageSet, trigger: Trigger | None, n: int, seed: int = 0,
                    device: torch.device | str | None = None) -> Metrics:
    """:func:`evaluate` on ``n`` test images drawn at random (seeded; a test split may be sorted by class)."""
    if n >= len(test):
        return evaluate(model, test, trigger, device=device)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(int(seed) + 101))[:n]
    return evaluate(model, test.subset(idx.sort().values), trigger, device=device)
