"""Plain fine-tuning (FT): the control every defense must beat.

Continue training the suspect with cross-entropy on the clean pool so the unused trigger pathway is
forgotten (BackdoorBench ``defense/ft.py``: 5% of the training set, 100 epochs, SGD lr 0.01, cosine).
The budget is counted in optimisation steps (``steps``): the official 100 epochs over 2,500 images in batches of 256
are 1,000 steps, the ``paper`` preset; a step count is the same work on any pool size.

Deviation: the ``quick`` preset runs 160 steps of 64 images at lr 0.05, so a CPU demo finishes in about half a
minute; the last model is returned, no selection. Chosen on the zoo's development suspects
(``scripts/choose_presets.py``, docs/preset-choice.md; never a test suspect) among 80 or 160 steps at lr 0.05 or
0.03, one development suspect per attack (defense seed 1000): 160 steps at 0.05 removed the backdoor on 1 of 4
(BadNets: ASR 0.031 at a BA drop of 0.020), as did the two lr-0.03 settings (on WaNet), and had the lowest mean
ASR + drop of those three (0.369 / 0.023 over the four attacks); the former 80 steps removed none within a 0.03 drop
(0.351 / 0.033). No setting removes Blended (ASR >= 0.78), as BackdoorBench reports for Blended on CIFAR-10
(ASR 96%).

Earlier (round 2), on a development split that shared the test suspects' weights and seeds (issue 28), seeds 0-2,
BA drop / ASR as mean +- sd, by the mean DER over BadNets and Blended:
    80 steps, lr 0.05 (quick): BadNets 0.069 +- 0.005 / 0.113 +- 0.090, Blended 0.061 +- 0.014 / 0.540 +- 0.378;
    140 steps, lr 0.05 (the former 20 epochs): BadNets 0.071 +- 0.007 / 0.146 +- 0.218, Blended 0.051 +- 0.018 /
    0.491 +- 0.350 (the same DER, 75% more work);
    80 steps, lr 0.02: BadNets 0.039 +- 0.011 / 0.595 +- 0.346, Blended 0.027 +- 0.006 / 0.951 +- 0.019;
    80 steps, lr 0.01: BadNets 0.022 +- 0.005 / 0.982 +- 0.008, Blended 0.015 +- 0.002 / 0.991 +- 0.013.
On the narrow demo models fine-tuning trades BA for ASR along this curve; it removes BadNets only at a cost of ~7
BA points and leaves Blended half in place, as BackdoorBench reports for Blended on CIFAR-10 (ASR 96%).

``quick`` measured on the development split (2,000 Fashion-MNIST images the demo never used;
``scripts/capacity_study.py``, 1,000-image pool kept out of training, seeds 0-2; BA drop / ASR, mean +- sd,
seconds): width 16 (bundle v2): BadNets 0.039 +- 0.014 / 0.068 +- 0.022 (15 s), Blended 0.041 +- 0.004 / 0.786 +-
0.191 (15 s); width 8: BadNets 0.030 +- 0.009 / 0.058 +- 0.034 (7 s), Blended 0.041 +- 0.009 / 0.658 +- 0.200 (7 s).
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
    presets = {"quick": {"steps": 160, "lr": 0.05, "batch_size": 64}, "paper": {}}

    def repair(self, model, params: FineTuneParams, ctx: RepairContext) -> DefenseOutput:
        losses = fine_tune(model, ctx, steps=params.steps, lr=params.lr, batch_size=params.batch_size,
                           momentum=params.momentum, weight_decay=params.weight_decay, augment=params.augment)
        pool = ctx.pool
        return DefenseOutput(model, {"held_out_ba": pool_accuracy(model, pool.x_val, pool.y_val, ctx.device)},
                             {"loss": losses})
