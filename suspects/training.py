"""The one training loop (:func:`fit`) and training a (possibly backdoored) suspect: ``backdoor-lens train``.

:func:`fit` is used by every training stage in the project (suspect training, fine-tuning defenses, CBD, DBD):
autocast to the dtype :func:`~suspects.device.amp_dtype` picks, with a gradient scaler for float16 only.

Suspect training: SGD with momentum and a cosine schedule by default; random-crop augmentation applied after
poisoning (as BackdoorBench does); mixed precision and channels-last on GPU. Per-epoch BA and ASR on the test
split are reported for the user only: nothing is selected or stopped on them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import defense_pool_split, load_dataset
from .device import (
    amp_dtype,
    autocast,
    describe_device,
    grad_scaler,
    needs_grad_scaler,
    pick_device,
    prepare_model,
    to_device,
)
from .metrics import evaluate, metric_definitions, stamp_metrics
from .models import create_model
from .poison import PoisonedDataset
from .store import Suspect, library_versions, save
from .triggers import make_trigger

__all__ = ["TrainConfig", "train_suspect", "Progress", "seed_everything", "augment_batch", "fit", "FitStep"]

Progress = Callable[[float, str, dict], None]
"""progress(fraction in [0, 1], message, metrics) — one callback type for tqdm and the dashboard."""


def _no_progress(fraction: float, message: str, metrics: dict) -> None:
    pass


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in the suspect card)."""

    data: dict = field(default_factory=lambda: {"name": "demo"})
    model: str = "preact_resnet18"
    width: int = 64
    attack: str | None = "badnets"
    attack_params: dict = field(default_factory=dict)
    target: int = 0
    mapping: str = "all-to-one"
    poison_rate: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: str = "crop"
    pool_fraction: float = 0.05
    train_on_pool: bool = True  # False: the defense pool is kept out of training (a reviewer's own clean data)
    seed: int = 0
    max_steps: int | None = None
    device: str | None = None
    name: str | None = None

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.augment not in ("none", "crop", "crop-flip"):
            raise ValueError(f"augment must be 'none', 'crop' or 'crop-flip', got {self.augment!r}")
        if not 0 <= self.poison_rate <= 1:
            raise ValueError(f"poison_rate must lie in [0, 1], got {self.poison_rate}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Random crop (zero padding of H/8 pixels) and optional horizontal flip, per sample."""
    if mode == "none":
        return x
    b, _, h, w = x.shape
    pad = pad if pad is not None else max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (b, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (b, w)
    idx_b = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if mode == "crop-flip":
        flip = torch.rand(b, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out.contiguous()

class FitStep(NamedTuple):
    """What :func:`fit` tells its ``tick`` after every optimiser step."""

    epoch: int  # 0-based epoch
    batch: int  # 0-based batch within the epoch
    step: int  # steps done so far over the whole run (1 after the first)
    loss: float  # this batch's loss
    epoch_loss: float  # weighted mean loss of the epoch so far


def fit(model: nn.Module, batches: Iterable[Any] | Callable[[int], Iterable[Any]],
        loss_fn: Callable[[Any], torch.Tensor | tuple[torch.Tensor, float]], optimizer: torch.optim.Optimizer, *,
        device: torch.device | str, epochs: int = 1, scheduler: Any = None, amp: bool | torch.dtype = True,
        train_mode: bool = True, max_steps: int | None = None, tick: Callable[[FitStep], None] | None = None,
        should_stop: Callable[[], bool] | None = None, after_step: Callable[[], None] | None = None,
        end_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """The one training loop: for each epoch and batch, ``loss_fn(batch)`` under autocast, backward, optimiser step.

    - ``batches``: a callable ``batches(epoch)`` returning that epoch's batches (drawn lazily, so augmentation uses
      its random generator in the same order as a hand-written loop), or an iterable for a single epoch.
    - ``loss_fn(batch)`` returns the loss, or ``(loss, weight)`` where weight is the batch's share of the epoch mean
      (e.g. its size; 1 by default).
    - ``amp``: True = the device's mixed precision (:func:`~suspects.device.amp_dtype`: bfloat16 / float16 on CUDA,
      none on the CPU), False = full precision, or an explicit autocast dtype. float16 gets a
      :class:`torch.amp.GradScaler` (:func:`~suspects.device.grad_scaler`); bfloat16 and float32 get none.
    - ``model.train(train_mode)`` at the start of every epoch (hooks in between may switch to eval mode).
    - Per step, in this order: ``optimizer.step()``, ``scheduler.step()``, ``after_step()``, ``tick(FitStep)``.
      ``tick`` may raise (e.g. :class:`~defenses.context.Cancelled`) to abort the run.
    - Before each batch is drawn: stop once ``max_steps`` steps are done or ``should_stop()`` is true; the epoch
      in progress still counts and gets its ``end_epoch(epoch, mean_loss)`` call (no further epochs start).

    Returns the per-epoch weighted mean losses.
    """
    if not callable(batches) and epochs != 1:
        raise ValueError("fit: give batches as a callable batches(epoch) to train for more than one epoch")
    dtype = amp if isinstance(amp, torch.dtype) else amp_dtype(device, bool(amp))
    scaler = grad_scaler(device, dtype)
    losses: list[float] = []
    step = 0
    for epoch in range(epochs):
        model.train(train_mode)
        it: Iterator[Any] = iter(batches(epoch) if callable(batches) else batches)
        total, seen, i, stopped = 0.0, 0.0, 0, False
        while True:
            if (max_steps is not None and step >= max_steps) or (should_stop is not None and should_stop()):
                stopped = True
                break
            try:
                batch = next(it)
            except StopIteration:
                break
            with autocast(device, enabled=dtype is not None, dtype=dtype):
                out = loss_fn(batch)
            loss, weight = out if isinstance(out, tuple) else (out, 1.0)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step()
            value = float(loss.detach())
            total += value * weight
            seen += weight
            step += 1
            if tick is not None:
                tick(FitStep(epoch, i, step, value, total / seen if seen else 0.0))
            i += 1
        losses.append(total / seen if seen else 0.0)
        if end_epoch is not None:
            end_epoch(epoch, losses[-1])
        if stopped:
            break
    return losses


def train_suspect(cfg: TrainConfig, out_dir: str | Path | None = None, progress: Progress = _no_progress,
                  overwrite: bool = False) -> Suspect:
    """Train a model on the (poisoned) training split and return it as a :class:`Suspect` (saved to ``out_dir``)."""
    cfg.validate()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    pair = load_dataset(cfg.data)
    train, test = pair.train, pair.test
    classes, shape = pair.classes, pair.input_shape
    poisonable, pool = defense_pool_split(len(train), cfg.pool_fraction, cfg.seed)
    trigger = None
    if cfg.attack:
        trigger = make_trigger(cfg.attack, shape, len(classes), cfg.target, cfg.mapping, **cfg.attack_params)
    dataset = PoisonedDataset(train, trigger, cfg.poison_rate, cfg.seed, exclude=pool)
    joint = trigger is not None and trigger.joint_training
    if joint:  # the trigger is trained with the classifier (IAD): clean images, each sample's role, poisoned per batch
        x_all, y_all = train.images(), dataset.labels.clone()
        roles = dataset.poisoned_mask.long() + 2 * dataset.noise_mask.long()
    else:
        x_all, y_all, _ = dataset.materialize()
        roles = None
    if not cfg.train_on_pool:  # the pool stays unseen: its accuracy is a held-out accuracy, not a training one
        x_all, y_all = x_all[poisonable], y_all[poisonable]
        roles = roles[poisonable] if roles is not None else None
    mean, std = train.channel_stats()
    model = create_model(cfg.model, num_classes=len(classes), in_channels=shape[0], width=cfg.width,
                         mean=[round(m, 4) for m in mean], std=[round(s, 4) for s in std])
    model = prepare_model(model, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.momentum > 0)
    steps_per_epoch = math.ceil(len(x_all) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, int(cfg.max_steps))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps) if cfg.schedule == "cosine"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    gen = torch.Generator().manual_seed(cfg.seed)
    trainer = None
    if joint:  # e.g. IAD's mask generator is trained here, before the classifier
        trainer = trigger.joint_trainer(x_all, device=device, batch_size=cfg.batch_size, seed=cfg.seed,
                                        max_steps=cfg.max_steps, total_steps=total_steps,
                                        augment=lambda x: augment_batch(x, cfg.augment, gen), progress=progress)
    history: list[dict] = []
    done = [0]
    t0 = time.time()

    def epoch_batches(epoch: int):
        perm = torch.randperm(len(x_all), generator=gen)
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            xb, yb = to_device(augment_batch(x_all[idx], cfg.augment, gen), device), y_all[idx].to(device)
            yield (xb, yb) if roles is None else (xb, yb, roles[idx].to(device))

    def loss_fn(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, int]:
        if trainer is not None:  # the trigger makes the batch's poisoned copies and adds its own loss terms
            return trainer.loss(model, *batch), len(batch[1])
        xb, yb = batch
        return F.cross_entropy(model(xb), yb), len(yb)

    def tick(s: FitStep) -> None:
        done[0] = s.step
        if s.step % 10 == 0:
            progress(s.step / total_steps, f"epoch {s.epoch + 1}/{cfg.epochs}", {"loss": s.epoch_loss})

    def end_epoch(epoch: int, loss: float) -> None:
        m = evaluate(model, test, trigger, device=device)
        row = {"epoch": epoch + 1, "loss": loss, "ba": m.ba, "asr": m.asr, "ra": m.ra,
               "seconds": round(time.time() - t0, 1)}
        history.append(row)
        progress(done[0] / total_steps, f"epoch {epoch + 1}/{cfg.epochs}",
                 {k: v for k, v in row.items() if v is not None})

    # a jointly trained trigger has its own optimiser, stepped in after_step: no float16 loss scaling (bfloat16 is fine)
    amp = not (trainer is not None and needs_grad_scaler(amp_dtype(device)))
    fit(model, epoch_batches, loss_fn, opt, device=device, epochs=cfg.epochs, scheduler=sched, amp=amp,
        max_steps=total_steps, tick=tick, end_epoch=end_epoch, after_step=trainer.after_step if trainer else None)
    if trainer is not None:
        trainer.finish()
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    final = evaluate(model, test, trigger, device="cpu")
    name = cfg.name or (Path(out_dir).name if out_dir else (cfg.attack or "clean"))
    card: dict[str, Any] = {
        "name": name,
        "arch": cfg.model,
        "arch_kwargs": {"width": cfg.width},
        "classes": classes,
        "input_shape": list(shape),
        "normalization": {"mean": model.normalize.mean.flatten().tolist(), "std": model.normalize.std.flatten().tolist()},
        "data": pair.spec,
        "split": {"pool_fraction": cfg.pool_fraction, "seed": cfg.seed, "n_train": len(train),
                  "n_pool": len(pool), "n_test": len(test), "pool_in_training": cfg.train_on_pool},
        "trigger": trigger.spec() if trigger else None,
        "poison": ({"rate": cfg.poison_rate, "seed": cfg.seed, "n_poisoned": len(dataset.poison_idx),
                    "n_noise": len(dataset.plan.noise_idx), "clean_label": trigger.clean_label}
                   if trigger else None),
        "metrics": stamp_metrics(final, model, test, trigger, "test split (CPU, float32)"),
        "metric_definitions": metric_definitions(trigger),
        "training": {**asdict(cfg), "device": describe_device(device), "seconds": round(time.time() - t0, 1),
                     "history": history},
        "seed": cfg.seed,
        "provenance": {"source": "backdoor-lens train"},
        "versions": library_versions(),
    }
    suspect = Suspect(model, card, None, _plan=dataset.plan if trigger else None)
    if out_dir is not None:
        save(suspect, out_dir, overwrite=overwrite)
    return suspect
