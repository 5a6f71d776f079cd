"""FT-SAM: fine-tuning with sharpness-aware minimisation, Zhu, Wei, Shen, Fan & Wu, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023 (arXiv 2304.11823). Official code: BackdoorBench
``defense/ft-sam.py`` (class ``dsam``) with ``utils/defense_utils/sam/{sam,scheduler,util}.py``; read, not copied.

Backdoor neurons have large weight norms, and plain fine-tuning on a little clean data barely moves them; SAM's
perturbation is largest where the loss is sharpest, which shrinks them. Every step:

1. g = grad of the loss at w (label-smoothed cross-entropy, smoothing 0.1);
2. the adaptive (ASAM) perturbation e = rho * w^2 * g / || |w| * g || (element-wise products, the norm over all
   trainable parameters), added to the weights;
3. a second forward/backward pass at w + e with BatchNorm's running statistics frozen (momentum 0);
4. w restored, then a base-optimiser step (SGD) with the gradient from the perturbed weights.

The official ``--alpha`` gradient decomposition defaults to 0, i.e. plain (A)SAM, which is what this implements.

Defaults (``paper`` preset; ``config/defense/ft-sam/cifar10.yaml`` and the argparse defaults): rho 2 (constant:
``rho_max = rho_min = 2``), adaptive perturbation (``--adaptive`` is ``store_false``, so on), label smoothing 0.1,
SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, 100 epochs of 5% of CIFAR-10 (2,500 images: 10 steps an
epoch, 1,000 steps; the budget is counted in steps as for plain fine-tuning).

Deviations from the official code:
- Schedule: BackdoorBench steps its ``CosineAnnealingLR(T_max=100)`` after every *iteration*
  (``ft-sam.py`` ``_train_sam``), so the learning rate reaches 0 after 100 steps and then rises and falls with a
  period of 200 steps (methods-2.md, FT-SAM pitfall). ``t_max`` keeps that: ``paper`` sets ``t_max = 100`` (the
  official behaviour); ``t_max = 0`` is one cosine over the whole budget, as ``quick`` uses.
- The loss is the cross-entropy with smoothed targets (1 - 0.1 on the label, 0.1 / (C - 1) elsewhere); the official
  KL divergence to the same targets differs from it by the targets' constant entropy (same gradients).
- The clean data are the defense pool as drawn (the official draws 5% class-balanced, ``choose_by_class``), through
  the project's one training loop (``defenses.common.fine_tune``) with its augmentation (``augment``; the official
  CIFAR transform is random crop + horizontal flip).
- Under float16 mixed precision (older GPUs) the second pass is not loss-scaled.
- ``quick``: 60 steps of 64 images at lr 0.05, one cosine, rho 2, random crop (about 5.5 passes over the 700
  training images of the default pool, each step two forward/backward passes). Kept after the choice on the zoo's
  development suspects (``scripts/choose_presets.py``, docs/preset-choice.md; lr 0.05, 0.03, and 0.03 for 100
  steps, one suspect per attack): every setting brings ASR low (mean 0.06-0.20) but none within a 0.03 BA drop
  (mean drop 0.124 at lr 0.05, 0.079 at 0.03, 0.052 at 0.03 x 100 steps), and lr 0.05 has the lowest mean ASR + BA
  drop. Before that, two single runs (seed 0) guided it: lr 0.02 left demo:badnets' ASR at 0.82 (test
  split, BA 0.905 -> 0.848); lr 0.05 on 1,000 development images (``scripts/tune_on_dev.py``, before the development
  suspects existed): BA 0.912 -> 0.805, ASR 0.999 -> 0.030. It buys the removal with about 10 BA points; the final
  run of ``quick`` is in ``docs/fidelity.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import autocast

from .base import Defense, DefenseOutput, ThreatModel, param
from .common import fine_tune, pool_accuracy
from .context import RepairContext
from .registry import register_defense


@dataclass
class FTSAMParams:
    steps: int = param(1000, help="optimisation steps (batches; each costs two forward/backward passes); the "
                                  "official 100 epochs over 2,500 images in batches of 256 are 1,000 steps",
                       min=1, max=100000)
    rho: float = param(2.0, help="rho: radius of the (adaptive) weight perturbation", min=0.0, max=100.0)
    adaptive: bool = param(True, help="ASAM: scale the perturbation by |w| (official default: on)")
    label_smoothing: float = param(0.1, help="label smoothing of the cross-entropy", min=0.0, max=0.99)
    lr: float = param(0.01, help="SGD learning rate (cosine schedule)", min=1e-6, max=1.0)
    t_max: int = param(100, help="cosine period in steps, stepped every step as BackdoorBench does (100: the "
                                 "official schedule, back up after 100 steps); 0 = one cosine over all steps",
                       min=0, max=100000)
    momentum: float = param(0.9, help="SGD momentum", min=0.0, max=0.999)
    weight_decay: float = param(5e-4, help="L2 weight decay", min=0.0, max=0.1)
    batch_size: int = param(256, help="images per step", min=1, max=4096)
    augment: str = param("crop-flip", help="training augmentation", choices=("none", "crop", "crop-flip"))


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with targets 1 - smoothing on the label and smoothing / (C - 1) on every other class."""
    n = logits.shape[1]
    if smoothing == 0 or n < 2:
        return F.cross_entropy(logits, y)
    target = torch.full_like(logits, smoothing / (n - 1), dtype=torch.float32)
    target.scatter_(1, y.unsqueeze(1), 1.0 - smoothing)
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class SAM(torch.optim.Optimizer):
    """(Adaptive) sharpness-aware minimisation around a base optimiser (Foret et al., ICLR 2021; Kwon et al., ICML
    2021). ``step()`` expects the gradients at w (computed by the training loop); it perturbs the weights, calls
    ``second_pass()`` (a forward/backward on the same batch) with BatchNorm's running statistics frozen, restores
    the weights and steps the base optimiser with the perturbed gradients. Shares the base optimiser's parameter
    groups, so a learning-rate scheduler built on it drives the base optimiser."""

    def __init__(self, base: torch.optim.Optimizer, model: nn.Module, rho: float, adaptive: bool,
                 second_pass: Callable[[], torch.Tensor], eps: float = 1e-12):
        super().__init__([p for g in base.param_groups for p in g["params"]], {"rho": rho, "adaptive": adaptive})
        self.base = base
        self.param_groups = base.param_groups
        self.model, self.rho, self.adaptive, self.second_pass, self.eps = model, rho, adaptive, second_pass, eps

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - the training loop computed the first gradient already
        params = self._params()
        if not params:
            return None
        scaled = [(p.abs() * p.grad) if self.adaptive else p.grad for p in params]
        norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2)
        scale = self.rho / (norm + self.eps)
        shifts = []
        for p in params:
            e = p.grad * scale
            if self.adaptive:
                e = e * p.pow(2)
            p.add_(e)
            shifts.append(e)
        momenta = {}
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                momenta[m] = m.momentum
                m.momentum = 0.0
        try:
            self.base.zero_grad(set_to_none=True)
            with torch.enable_grad():
                self.second_pass().backward()
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum
            for p, e in zip(params, shifts, strict=True):
                p.sub_(e)
        self.base.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)


@register_defense
class FTSAM(Defense):
    name = "ftsam"
    title = "Fine-tuning with sharpness-aware minimisation (FT-SAM)"
    paper = "Zhu et al., ICCV 2023 (arXiv 2304.11823)"
    order = 62
    needs = ("rebuildable", "trainable")
    summary = ("Fine-tunes the suspect on a small clean set with sharpness-aware minimisation: each step first "
               "pushes the weights uphill in proportion to their size, then descends from there. The large-norm "
               "backdoor neurons that plain fine-tuning leaves alone are shrunk, so the backdoor fades faster.")
    threat = ThreatModel(clean_pool=True)
    Params = FTSAMParams
    presets = {"quick": {"steps": 60, "lr": 0.05, "batch_size": 64, "t_max": 0, "augment": "crop"}, "paper": {}}
    curve_labels = {"loss": "training loss per epoch (label-smoothed, at w)"}

    def repair(self, model, params: FTSAMParams, ctx: RepairContext) -> DefenseOutput:
        last: dict[str, torch.Tensor] = {}

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            last["x"], last["y"] = x, y
            return smoothed_cross_entropy(model(x), y, params.label_smoothing)

        def second_pass() -> torch.Tensor:
            with autocast(ctx.device):
                return smoothed_cross_entropy(model(last["x"]), last["y"], params.label_smoothing)

        def optimizer(trainable: list[nn.Parameter]) -> torch.optim.Optimizer:
            base = torch.optim.SGD(trainable, lr=params.lr, momentum=params.momentum,
                                   weight_decay=params.weight_decay)
            return SAM(base, model, params.rho, params.adaptive, second_pass)

        def schedule(opt: torch.optim.Optimizer, total_steps: int):
            period = params.t_max if params.t_max > 0 else max(1, total_steps)
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=period)

        for p in model.parameters():
            p.requires_grad_(True)
        losses = fine_tune(model, ctx, steps=params.steps, lr=params.lr, batch_size=params.batch_size,
                           momentum=params.momentum, weight_decay=params.weight_decay, augment=params.augment,
                           schedule=schedule, loss=loss, optimizer=optimizer, label="FT-SAM")
        pool = ctx.pool
        return DefenseOutput(model, {"held_out_ba": pool_accuracy(model, pool.x_val, pool.y_val, ctx.device)},
                             {"loss": losses})
