"""Trigger reverse-engineering in the style of Neural Cleanse (Wang et al., IEEE S&P 2019).

For each candidate target class t, optimise a mask m (H x W, in [0, 1]) and a pattern p (C x H x W, in [0, 1])
so that clean images stamped as (1 - m) * x + m * p are classified as t, with the smallest mask:
min CE(f((1 - m) x + m p), t) + lambda * |m|_1. A backdoor target needs a much smaller mask than the other
classes; the anomaly index |l1_t - median| / (1.4826 * MAD) of the mask norms flags it when it exceeds a
threshold (2 by default) on the small side. Only clean defense-pool images are used.

Deviation from the paper: a fixed lambda (no adaptive schedule) and a fixed number of Adam steps per class, so a
scan of 10 classes fits in minutes on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import to_device

__all__ = ["ReverseResult", "reverse_engineer_class", "neural_cleanse", "anomaly_indices"]


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

    def to_dict(self) -> dict:
        return {"l1": self.l1.tolist(), "success": self.success.tolist(), "anomaly_index": self.anomaly.tolist(),
                "flagged": self.flagged, "threshold": self.threshold}


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
    """Scan every class; flag those whose anomaly index exceeds ``threshold`` (small-mask side)."""
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
    return ReverseResult(np.stack(masks), np.stack(patterns), l1_arr, np.array(success), anomaly, flagged, threshold)
