"""Building blocks shared by the defenses: fine-tuning on the pool, pool metrics, last-layer channel masks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import autocast, to_device
from suspects.metrics import predict
from suspects.models import model_api
from suspects.training import augment_batch
from suspects.triggers import Trigger

from .base import Progress

__all__ = ["fine_tune", "pool_accuracy", "pool_asr", "pool_monitor", "last_feature_layer", "mask_linear_inputs",
           "head"]


def pool_monitor(model: nn.Module, pool: dict, trigger: Trigger | None, device) -> Callable[[], dict]:
    """Held-out pool BA (and ASR when a trigger is known) for live charts; never the test split."""
    def measure() -> dict:
        out = {"held_out_ba": pool_accuracy(model, pool["x_val"], pool["y_val"], device)}
        asr = pool_asr(model, pool["x_val"], pool["y_val"], trigger, device)
        if asr is not None:
            out["held_out_asr"] = asr
        return out
    return measure


def head(model: nn.Module) -> nn.Linear:
    """The final linear classifier (``get_classifier()`` of :class:`~suspects.models.InspectableModel`)."""
    return model_api(model).get_classifier()


def pool_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> float:
    if len(y) == 0:
        return float("nan")
    return float((predict(model, x, device=device) == y).float().mean())


def pool_asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger | None, device) -> float | None:
    """ASR on triggered copies of held-out pool images (never the test split)."""
    if trigger is None:
        return None
    mask = trigger.test_mask(y)
    covers = getattr(trigger, "covers", None)  # a stored trigger (BackdoorBench import) may not poison every image
    if callable(covers):
        mask = mask & covers(x)
    if not mask.any():
        return None
    preds = predict(model, x[mask], device=device, transform=trigger)
    return float((preds == trigger.target_labels(y[mask])).float().mean())


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, epochs: int, lr: float,
              batch_size: int, momentum: float = 0.9, weight_decay: float = 5e-4, augment: str = "crop",
              schedule: str = "cosine", params: Iterable[nn.Parameter] | None = None, seed: int = 0,
              after_step: Callable[[], None] | None = None, progress: Progress | None = None,
              train_mode: bool = True, label: str = "fine-tuning",
              monitor: Callable[[], dict] | None = None) -> list[float]:
    """Plain cross-entropy training on ``(x, y)``; returns the per-epoch mean loss."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(x) // batch_size))
    total = epochs * steps_per_epoch
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total)) if schedule == "cosine"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    gen = torch.Generator().manual_seed(seed)
    losses, step = [], 0
    for epoch in range(epochs):
        model.train(train_mode)
        perm = torch.randperm(len(x), generator=gen)
        total_loss, seen = 0.0, 0
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            xb = to_device(augment_batch(x[idx], augment, gen), device)
            yb = y[idx].to(device)
            with autocast(device):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            step += 1
            total_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
        losses.append(total_loss / max(seen, 1))
        if progress is not None:
            extra = monitor() if monitor is not None else {}
            progress((epoch + 1) / epochs, f"{label}: epoch {epoch + 1}/{epochs}", {"loss": losses[-1], **extra})
    model.eval()
    return losses


def last_feature_layer(model: nn.Module) -> str:
    """Name of the module whose output is pooled into the classifier (the 'last conv layer' of the papers)."""
    return model_api(model).feature_layer()


@torch.no_grad()
def last_layer_activations(model: nn.Module, x: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """(N, C, h, w) output of the last feature layer."""
    modules = dict(model.named_modules())
    captured: list[torch.Tensor] = []
    handle = modules[last_feature_layer(model)].register_forward_hook(
        lambda m, i, o: captured.append(o.detach().float().cpu()))
    model.eval()
    try:
        for s in range(0, len(x), batch_size):
            model(to_device(x[s:s + batch_size], device))
    finally:
        handle.remove()
    return torch.cat(captured)


def mask_linear_inputs(model: nn.Module, channels: list[int]) -> Callable[[], None]:
    """Prune last-layer channels by zeroing their columns in the classifier (exact for avg-pooled features).

    Returns a function that re-applies the mask, to call after every optimiser step while fine-tuning.
    """
    lin = head(model)
    keep = torch.ones(lin.in_features, device=lin.weight.device)
    if channels:
        keep[torch.as_tensor(channels, dtype=torch.long, device=lin.weight.device)] = 0.0

    def apply() -> None:
        with torch.no_grad():
            lin.weight.mul_(keep.to(lin.weight.dtype))

    apply()
    return apply
