"""Plain fine-tuning (FT): the control every defense must beat.

Continue training the suspect with cross-entropy on the clean pool so the unused trigger pathway is
forgotten (BackdoorBench ``defense/ft.py``: 5% of the training set, 100 epochs, SGD lr 0.01, cosine).
Deviation: the ``quick`` preset uses fewer epochs and a higher learning rate so a CPU demo finishes in
seconds; the last model is returned, no selection.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Defense, DefenseOutput, ThreatModel, param
from .common import fine_tune, pool_accuracy
from .context import RepairContext
from .registry import register_defense


@dataclass
class FineTuneParams:
    steps: int = param(1000, help="optimisation steps (batches); the official 100 epochs over 2,500 images in batches "
                             "of 256 are 1,000 steps", min=1, max=100000)
    lr: float = param(0.01, help="SGD learning rate (cosine-annealed to 0)", min=1e-6, max=1.0)
    momentum: float = param(0.9, help="SGD momentum", min=0.0, max=0.999)
    weight_decay: float = param(5e-4, help="L2 weight decay", min=0.0, max=0.1)
    batch_size: int = param(256, help="images per step", min=1, max=4096)
    augment: str = param("crop", help="training augmentation", choices=("none", "crop", "crop-flip"))


@register_defense
class FineTune(Defense):
    name = "finetune"
    title = "Fine-tuning"
    paper = "baseline (BackdoorBench defense/ft.py)"
    order = 60
    summary = ("Keeps training the suspect on a small clean set with plain cross-entropy. The trigger pathway is "
               "never exercised, so it tends to fade; this is the control every defense must beat.")
    threat = ThreatModel(clean_pool=True)
    Params = FineTuneParams
    presets = {"quick": {"steps": 80, "lr": 0.05, "batch_size": 64}, "paper": {}}

    def repair(self, model, params: FineTuneParams, ctx: RepairContext) -> DefenseOutput:
        losses = fine_tune(model, ctx, steps=params.steps, lr=params.lr, batch_size=params.batch_size,
                           momentum=params.momentum, weight_decay=params.weight_decay, augment=params.augment)
        pool = ctx.pool
        return DefenseOutput(model, {"held_out_ba": pool_accuracy(model, pool.x_val, pool.y_val, ctx.device)},
                             {"loss": losses})
