"""DBD stages 2 and the split: a noise-robust linear head on the frozen backbone, then label dropping.

The head is trained with the symmetric cross-entropy (Wang et al., "Symmetric Cross Entropy for Robust Learning
with Noisy Labels", ICCV 2019), so the relabelled poisoned samples keep a high loss; every stage-3 epoch the
lowest-loss ``epsilon`` share keeps its labels and the rest loses them (Huang et al., ICLR 2022).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import autocast, to_device
from suspects.models import penultimate_features
from suspects.training import FitStep, augment_batch, fit

from ..common import head
from ..retrain import TrainingSet

__all__ = ["sce_loss", "warmup_train", "sce_split"]


def sce_loss(logits: torch.Tensor, y: torch.Tensor, alpha: float, beta: float,
             reduction: str = "mean") -> torch.Tensor:
    """Symmetric cross-entropy alpha * CE + beta * RCE, RCE = -sum_k p_k log clip(onehot_k, 1e-4, 1)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, y, reduction="none")
    p = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    rce = -math.log(1e-4) * (1.0 - p.gather(1, y[:, None]).squeeze(1))
    loss = alpha * ce + beta * rce
    return loss.mean() if reduction == "mean" else loss


def warmup_train(model: nn.Module, opt: torch.optim.Optimizer, data: TrainingSet, device, epochs: int,
                 batch_size: int, alpha: float, beta: float, augment: str, gen: torch.Generator, tick=None,
                 monitor=None, max_steps: int | None = None) -> list[dict]:
    """Stage 2: train only the linear head with SCE on no-grad backbone features (backbone in train mode)."""
    lin = head(model)
    rows: list[dict] = []
    steps = max(1, math.ceil(len(data) / batch_size))

    def batches(epoch: int):
        perm = torch.randperm(len(data), generator=gen)
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            yield to_device(augment_batch(data.x[idx], augment, gen), device), data.y[idx].to(device)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        xb, yb = batch
        with torch.no_grad():
            feats = penultimate_features(model, xb)
        return sce_loss(lin(feats.detach()), yb, alpha, beta), len(yb)

    def on_step(s: FitStep) -> None:
        if tick is not None:
            tick((s.epoch + (s.batch + 1) / steps) / max(epochs, 1), f"stage 2/3 warm-up: epoch {s.epoch + 1}/{epochs}")

    def end_epoch(epoch: int, loss: float) -> None:
        row = {"epoch": epoch + 1, "sce_loss": loss}
        if monitor is not None:
            row.update(monitor())
        rows.append(row)
        if tick is not None:
            tick((epoch + 1) / epochs, f"stage 2/3 warm-up: epoch {epoch + 1}/{epochs}", row)

    fit(model, batches, loss_fn, opt, device=device, epochs=epochs, max_steps=max_steps, tick=on_step,
        end_epoch=end_epoch)
    return rows


@torch.no_grad()
def sce_split(model: nn.Module, data: TrainingSet, device, epsilon: float, alpha: float, beta: float,
              augment: str, gen: torch.Generator, batch_size: int = 512,
              per_class: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample SCE (eval mode, training augmentation) and the mask of the lowest-``epsilon`` share (labelled),
    over all samples or, with ``per_class``, within each training label."""
    was = model.training
    model.eval()
    losses = []
    try:
        for s in range(0, len(data), batch_size):
            xb = to_device(augment_batch(data.x[s:s + batch_size], augment, gen), device)
            with autocast(device):
                logits = model(xb)
            losses.append(sce_loss(logits, data.y[s:s + batch_size].to(device), alpha, beta, "none").float().cpu())
    finally:
        model.train(was)
    loss = torch.cat(losses)
    labelled = torch.zeros(len(loss), dtype=torch.bool)
    groups = [torch.nonzero(data.y == c).flatten() for c in data.y.unique()] if per_class else [torch.arange(len(loss))]
    for idx in groups:
        labelled[idx[loss[idx].argsort()[:int(round(epsilon * len(idx)))]]] = True
    return loss, labelled
