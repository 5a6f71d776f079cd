"""Trigger reverse-engineering in the style of Neural Cleanse (Wang et al., IEEE S&P 2019).

For each candidate target class t, optimise a mask m (H x W, in [0, 1]) and a pattern p (C x H x W, in [0, 1])
so that clean images stamped as (1 - m) * x + m * p are classified as t, with the smallest mask:
min CE(f((1 - m) x + m p), t) + lambda * |m|_1. A backdoor target needs a much smaller mask than the other
classes; the anomaly index |l1_t - median| / (1.4826 * MAD) of the mask norms flags it when it exceeds a
threshold (2 by default) on the small side. Only clean defense-pool images are used.

Deviation from the paper: a fixed lambda (no adaptive schedule) and a fixed number of Adam steps per class, so a
scan of 10 classes fits in minutes on a CPU.

This module is the algorithm only; storing scans once per (weights, data, budget) and saving a suspect that adopts
a recovered trigger live in :mod:`runs.scans`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import to_device

__all__ = ["ReverseResult", "ScanConfig", "reverse_engineer_class", "neural_cleanse", "anomaly_indices",
           "scan_suspect", "model_fingerprint", "trigger_overlap", "recovered_trigger_spec", "scan_images"]


@dataclass
class ReverseResult:
    """Per class: mask (H, W), pattern (C, H, W), mask L1 norm, attack success on the pool; plus anomaly indices."""

    masks: np.ndarray
    patterns: np.ndarray
    l1: np.ndarray
    success: np.ndarray
    anomaly: np.ndarray
    flagged: list[int]
    threshold: float
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def most_suspicious(self) -> int:
        """The class with the largest anomaly index (the smallest mask relative to the others)."""
        return int(np.argmax(self.anomaly))

    def to_dict(self) -> dict:
        return {"l1": self.l1.tolist(), "success": self.success.tolist(), "anomaly_index": self.anomaly.tolist(),
                "flagged": self.flagged, "threshold": self.threshold, "seconds": round(self.seconds, 2),
                "config": self.config}


def anomaly_indices(l1: np.ndarray) -> np.ndarray:
    """Signed anomaly index per class: (median - l1) / (1.4826 * MAD); large positive = suspiciously small mask."""
    l1 = np.asarray(l1, dtype=np.float64)
    med = np.median(l1)
    mad = 1.4826 * np.median(np.abs(l1 - med))
    return (med - l1) / max(mad, 1e-12)


def reverse_engineer_class(model: nn.Module, x: torch.Tensor, target: int, steps: int = 100, lr: float = 0.1,
                           lam: float = 1e-2, batch_size: int = 64, seed: int = 0,
                           should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Optimise one class's (mask, pattern); returns mask, pattern, mask L1 norm and success rate on ``x``."""
    device = next(model.parameters()).device
    c, h, w = x.shape[1:]
    gen = torch.Generator().manual_seed(seed + target)
    mask_param = torch.full((1, 1, h, w), -2.0, device=device, requires_grad=True)
    pattern_param = (torch.rand((1, c, h, w), generator=gen) * 2 - 1).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_param, pattern_param], lr=lr, betas=(0.5, 0.9))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    labels = torch.full((batch_size,), target, dtype=torch.long, device=device)
    try:
        for _ in range(steps):
            if should_stop is not None and should_stop():
                raise InterruptedError("cancelled")
            idx = torch.randint(0, len(x), (batch_size,), generator=gen)
            xb = to_device(x[idx], device)
            m = (torch.tanh(mask_param) + 1) / 2
            pat = (torch.tanh(pattern_param) + 1) / 2
            stamped = (1 - m) * xb + m * pat
            loss = F.cross_entropy(model(stamped), labels[: len(xb)]) + lam * m.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            m = (torch.tanh(mask_param) + 1) / 2
            pat = (torch.tanh(pattern_param) + 1) / 2
            preds = []
            for s in range(0, len(x), 256):
                xb = to_device(x[s:s + 256], device)
                preds.append(model((1 - m) * xb + m * pat).argmax(1).cpu())
            success = float((torch.cat(preds) == target).float().mean())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return m[0, 0].cpu().numpy(), pat[0].cpu().numpy(), float(m.sum()), success


def neural_cleanse(model: nn.Module, x: torch.Tensor, num_classes: int, steps: int = 100, lr: float = 0.1,
                   lam: float = 1e-2, threshold: float = 2.0,
                   progress: Callable[[float, str, dict], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> ReverseResult:
    """Scan every class; flag those whose anomaly index exceeds ``threshold`` (small-mask side).

    ``should_stop`` is polled every step; when it returns True the scan raises ``InterruptedError``.
    """
    t0 = time.time()
    masks, patterns, l1, success = [], [], [], []
    for t in range(num_classes):
        m, p, n, s = reverse_engineer_class(model, x, t, steps, lr, lam, should_stop=should_stop)
        masks.append(m)
        patterns.append(p)
        l1.append(n)
        success.append(s)
        if progress is not None:
            progress((t + 1) / num_classes, f"class {t + 1}/{num_classes}", {"l1": n, "success": s})
    l1_arr = np.array(l1)
    anomaly = anomaly_indices(l1_arr)
    flagged = [int(i) for i in np.nonzero(anomaly > threshold)[0]]
    return ReverseResult(np.stack(masks), np.stack(patterns), l1_arr, np.array(success), anomaly, flagged, threshold,
                         seconds=time.time() - t0)


# --- scanning a suspect --------------------------------------------------------------------------------------


@dataclass
class ScanConfig:
    """The scan's budget: ``n_images`` clean defense-pool images, ``steps`` Adam steps per class (lr, batch 64),
    ``lam`` the weight of the mask's L1 norm, ``threshold`` on the anomaly index, ``seed`` for image choice."""

    n_images: int = 300
    steps: int = 100
    lr: float = 0.1
    lam: float = 1e-2
    threshold: float = 2.0
    seed: int = 0

    def check(self) -> None:
        if not 10 <= self.n_images <= 100_000:
            raise ValueError(f"n_images must lie in [10, 100000], got {self.n_images}")
        if not 1 <= self.steps <= 100_000:
            raise ValueError(f"steps must lie in [1, 100000], got {self.steps}")
        if not (0 < self.lr <= 10 and 0 <= self.lam <= 10):
            raise ValueError(f"lr must lie in (0, 10] and lam in [0, 10], got lr={self.lr}, lam={self.lam}")
        if not 0 < self.threshold <= 100:
            raise ValueError(f"threshold must lie in (0, 100], got {self.threshold}")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, shapes, values): the same weights give the same fingerprint."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def scan_images(suspect, config: ScanConfig) -> torch.Tensor:
    """The clean defense-pool images a scan uses (a seeded subset; never the test split)."""
    pool = suspect.defense_pool
    n = min(int(config.n_images), len(pool))
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(config.seed)))[:n]
    return pool.images(idx)


def scan_suspect(suspect, config: ScanConfig | None = None,
                 progress: Callable[[float, str, dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> ReverseResult:
    """Neural Cleanse over every class of ``suspect`` on its defense pool (computed every time; a stored scan,
    reused across runs, is :func:`runs.scans.scan_suspect`)."""
    config = config or ScanConfig()
    config.check()
    model = suspect.model
    x = scan_images(suspect, config)
    result = neural_cleanse(model, x, suspect.num_classes, steps=config.steps, lr=config.lr, lam=config.lam,
                            threshold=config.threshold, progress=progress, should_stop=should_stop)
    result.config = {**asdict(config), "images": int(len(x)), "source": "defense pool"}
    return result


def trigger_overlap(mask: np.ndarray, footprint: np.ndarray) -> dict[str, float]:
    """How a recovered mask sits on a known trigger's footprint: the share of the mask's mass on the footprint,
    and the IoU of the mask's peak region (>= half its maximum) with the footprint."""
    mask = np.asarray(mask, dtype=np.float64)
    fp = np.asarray(footprint, dtype=bool)
    mass = float((mask * fp).sum() / max(mask.sum(), 1e-12))
    peak = mask >= 0.5 * mask.max()
    iou = float((peak & fp).sum() / max((peak | fp).sum(), 1))
    return {"mass_on_trigger": mass, "footprint_share": float(fp.mean()), "iou": iou}


def recovered_trigger_spec(result: ReverseResult, target: int) -> dict[str, Any]:
    """The spec of a :class:`suspects.triggers.RecoveredTrigger` for class ``target`` of a scan."""
    return {"name": "recovered", "target": int(target), "mapping": "all-to-one",
            "params": {"mask": np.round(result.masks[target], 4).tolist(),
                       "pattern": np.round(result.patterns[target], 4).tolist(),
                       "source": {"method": "neural_cleanse", "anomaly_index": round(float(result.anomaly[target]), 3),
                                  "flagged": target in result.flagged, "mask_l1": round(float(result.l1[target]), 3),
                                  "config": result.config}}}
