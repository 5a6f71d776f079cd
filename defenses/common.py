"""Building blocks shared by the defenses: fine-tuning on the pool, pool metrics, last-layer channel masks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import to_device
from suspects.metrics import predict
from suspects.models import model_api
from suspects.training import FitStep, augment_batch, fit
from suspects.triggers import Trigger

from .context import DefensePool, RepairContext

__all__ = ["fine_tune", "shuffled_batches", "batches_per_epoch", "pool_accuracy", "pool_asr", "pool_monitor", "last_feature_layer", "mask_linear_inputs",
           "head"]


def pool_monitor(model: nn.Module, pool: DefensePool, trigger: Trigger | None, device) -> Callable[[], dict]:
    """Held-out pool BA (and ASR when a trigger is known) for live charts; never the test split."""
    def measure() -> dict:
        out = {"held_out_ba": pool_accuracy(model, pool.x_val, pool.y_val, device)}
        asr = pool_asr(model, pool.x_val, pool.y_val, trigger, device)
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


def triggerable(trigger: Trigger, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bool per image: counts for ASR (:meth:`~suspects.triggers.Trigger.test_mask`) and can be triggered; a stored
    trigger (a BackdoorBench import) without a trigger function poisons only the images it holds copies of."""
    mask = trigger.test_mask(y)
    covers = getattr(trigger, "covers", None)
    if callable(covers):
        mask = mask & covers(x)
    return mask


def pool_asr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger | None, device) -> float | None:
    """ASR on triggered copies of held-out pool images (never the test split)."""
    if trigger is None:
        return None
    mask = triggerable(trigger, x, y)
    if not mask.any():
        return None
    preds = predict(model, x[mask], device=device, transform=trigger)
    return float((preds == trigger.target_labels(y[mask])).float().mean())


def fine_tune(model: nn.Module, ctx: RepairContext, *, steps: int, lr: float, batch_size: int,
              momentum: float = 0.9, weight_decay: float = 5e-4, augment: str = "crop",
              after_step: Callable[[], None] | None = None, span: tuple[float, float] = (0.0, 1.0),
              label: str = "fine-tuning", schedule: str | Callable[..., object] = "cosine",
              penalty: Callable[[], torch.Tensor] | None = None,
              loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None) -> list[float]:
    """Cross-entropy on the pool's training part (plus ``penalty()`` when given; SGD, cosine schedule or a constant
    learning rate with ``schedule='constant'``, the trainable parameters only) through the
    one training loop :func:`suspects.training.fit`; reports every epoch with the held-out pool BA / ASR over the
    ``span`` of the defense's progress. ``penalty()``, when given, is added to every batch's loss (FST's term on
    the classifier). The budget is ``steps`` optimisation steps (the same work whatever the pool's size; the last
    pass over the pool may stop part-way).
    ``loss(x, y)``, when given, replaces the cross-entropy of a batch (NAD's distillation loss, FT-SAM's smoothed
    labels); ``optimizer(params)`` replaces SGD (given ``lr`` is then the optimiser's own); ``schedule`` may also be
    a function ``schedule(optimizer, total_steps)`` returning a scheduler stepped after every optimiser step.
    Returns the per-epoch mean loss; the model ends in eval mode."""
    x, y, device = ctx.pool.x, ctx.pool.y, ctx.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (optimizer(params) if optimizer is not None
           else torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
    steps_per_epoch = max(1, -(-len(x) // batch_size))
    if int(steps) < 1:
        raise ValueError(f"fine_tune: steps must be >= 1, got {steps}")
    total_steps = int(steps)
    epochs = max(1, -(-total_steps // steps_per_epoch))
    if callable(schedule):
        sched = schedule(opt, total_steps)
    elif schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    else:
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
                 if schedule == "cosine" else None)
    gen = torch.Generator().manual_seed(int(ctx.seed))  # the run's seed: batch order and crops vary with it
    monitor = pool_monitor(model, ctx.pool, ctx.trigger, device)
    lo, hi = span

    def batches(epoch: int):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            yield to_device(augment_batch(x[idx], augment, gen), device), y[idx].to(device)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        xb, yb = batch
        value = loss(xb, yb) if loss is not None else F.cross_entropy(model(xb), yb)
        if penalty is not None:
            value = value + penalty()
        return value, len(yb)

    def tick(step: FitStep) -> None:
        ctx.check_cancel()

    def end_epoch(epoch: int, loss: float) -> None:
        done = min(total_steps, (epoch + 1) * steps_per_epoch)
        where = f"step {done}/{total_steps}"
        ctx.tick(lo + (hi - lo) * done / total_steps, f"{label}: {where}", {"loss": loss, **monitor()})

    losses = fit(model, batches, loss_fn, opt, device=device, epochs=epochs, scheduler=sched, after_step=after_step,
                 tick=tick, end_epoch=end_epoch, max_steps=total_steps)
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


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled index batches over ``n`` samples; a last batch of a single sample is dropped (BatchNorm
    in train mode needs two)."""
    perm = torch.randperm(n, generator=gen)
    return [perm[s:s + batch_size] for s in range(0, n, batch_size) if len(perm[s:s + batch_size]) >= 2]


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Batches of one epoch of :func:`shuffled_batches` over ``n`` samples."""
    return max(1, n // batch_size + (1 if n % batch_size >= 2 else 0))
