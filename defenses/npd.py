"""Neural Polarizer Defense (NPD), Zhu, Wei, Zha & Wu, "Neural Polarizer: A Lightweight and Effective Backdoor
Defense via Purifying Poisoned Features", NeurIPS 2023 (arXiv 2306.16697); official code in BackdoorBench
(``defense/npd.py``, header: official implementation; ``config/defense/npd/cifar10.yaml``), read, not copied.

A learnable linear layer, the *polarizer*, is inserted into the frozen backdoored model and trained alone to keep
the benign features and filter the trigger features. The official ``convbn`` polarizer is a 1x1 convolution C -> C
without bias (identity initialisation) followed by a BatchNorm2d. Training, as in the official code:

1. Warm-up: ``warmup_steps`` of SGD (lr 1e-4, no momentum) on the clean cross-entropy, the polarizer's BatchNorm in
   *train* mode (so its running statistics become the pool's feature statistics, as the official code does).
2. Bi-level rounds, the polarizer's BatchNorm in eval mode, the model frozen in eval mode, per batch:
   - target t = the highest-scoring class other than the true one (the current polarized model's clean logits);
   - a *targeted* attack in pixel space: delta starts at 0, up to ``inner_steps`` signed steps of ``adv_lr``
     minimising CE(f(x + delta), t) (per-image loss clamped at 80), x + delta clipped to [0, 1], each step
     projected onto the L2 ball of ``radius``; the attack stops once more than 60% of the batch reaches t;
   - the polarizer minimises CE(f(x), y) + lmd2 * CE(f(x + delta), y_clean) + lmd3 * -log(1 - p(y')) +
     lmd4 * -log(1 - p(t)), with y_clean the polarized model's clean prediction, p the softmax of f(x + delta) and
     y' its top class other than y (``1.0001 - p``, as the official code, so the log stays finite);
   - SGD lr 0.01, momentum 0.9, weight decay 5e-4, constant (the official scheduler is never stepped), no
     augmentation (the official ``train = False`` transform).
The last polarizer is kept; nothing is selected.

**How the polarizer is stored.** The official code saves the polarizer beside the model (``plug_layer.pt``) and a
separate script re-inserts it with a hook before evaluating. Here the repaired model must stay an ordinary suspect
(one weights file, rebuilt from its card, fingerprinted, exported and shown by every view), so the trained
polarizer is **folded into the network**: in eval mode it is the affine map z -> M z + c per pixel (M = diag(a) W,
a = gamma / sqrt(running_var + eps), c = beta - a * running_mean). Placed on the *output* of a convolution that
feeds a BatchNorm2d, it folds exactly: the convolution's weight becomes M K (channel mixing after a convolution is
again a convolution, whatever its padding) and c moves into the BatchNorm's running mean (mean - c), or into the
convolution's bias when it has one. The official position, the *input* of ``layer4.1.conv1``, does not fold
exactly: c passes through a zero-padded 3x3 convolution, which turns it into a position-dependent term at the
border (12 of the 16 positions of a 4x4 map). Rebuilding an extra module from the card instead would change the
architecture's key names and every consumer of a suspect (views, export, fingerprints). The fold is checked on
held-out pool images before the model is returned (largest logit difference, ``fold_error``).

Deviations:
- **Position**: the polarizer acts on the output of ``layer`` (a convolution feeding a BatchNorm2d), one
  convolution later than the official input of ``layer4.1.conv1``; ``auto`` takes the last such convolution run by
  the forward pass, which on PreAct-ResNet-18 is ``layer4.1.conv1`` (its output, before ``layer4.1.bn2``), on a
  torchvision ResNet ``layer4.1.conv2``.
- **Radius**: ``radius=0`` scales the official 3.0 (an L2 norm on 3 x 32 x 32 pixels in [0, 1]) to the input size,
  3.0 * sqrt(d / 3072) (1.52 on the demo's 1 x 28 x 28); on CIFAR-10 it is 3.0. (methods-2.md reads "init +r":
  that is the official L_inf branch; its L2 branch starts at 0.)
- Only the L2 attack (the official also has L_inf and L1) and only the ``convbn`` polarizer (the official offers
  ablation structures: ``onlyconv``, ``twoconv``, ``linear``, ``mlp``).
- The target class masks the true logit with -inf (the official sets it to -10, the same unless every other logit
  is below -10).
- Budgets in optimisation steps (``paper``: the official 5 + 50 epochs over 2,500 images in batches of 128 are 100 +
  1,000 steps); batches without replacement per pass; the pool's training part instead of a class-balanced 5%.
- The official code asserts a PreAct-ResNet-18; any model with a convolution feeding a BatchNorm2d runs here.

``quick`` is a tenth of the official budget (10 + 150 steps of 64) at the official radius 3.0 in pixels (not scaled
to the 28 x 28 input). The radius was chosen on the zoo's development suspects (``scripts/choose_presets.py``,
docs/preset-choice.md; one suspect per attack, defense seed 1000) over the scaled 1.52 and a faster polarizer
(lr 0.02): none removes a backdoor at this budget (0 of 4 each); radius 3.0 has the lowest mean ASR + BA drop (BadNets
ASR 0.655 vs. 0.930 at 1.52; Blended, SIG and WaNet stay at 0.97-0.99). Before that, with radius 1.52, measured once
on ``demo:badnets`` (seed 0, default pool: 700 to train on, 300 held
out; whole test split; one thread on a shared, loaded 2-core machine): BA 0.905 -> 0.857, ASR 0.997 -> 0.986 (the
backdoor stays; held-out pool ASR 0.99 through all 150 steps), fold error 0.0 on held-out logits; 450 s wall for the
whole command under a load average of 11-15, 89 s of CPU time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import to_device
from suspects.training import FitStep, augment_batch, fit

from .base import Defense, DefenseOutput, ThreatModel, param
from .common import pool_accuracy, pool_monitor
from .context import RepairContext
from .registry import register_defense

LOSS_BOUND = 80.0  # the official clamp of the per-image attack loss
SUCCESS_SHARE = 0.6  # the attack stops once more than this share of the batch reaches its target


@dataclass
class NPDParams:
    layer: str = param("auto", help="convolution whose output the polarizer transforms (it must feed a "
                       "BatchNorm2d); auto = the last such convolution of the forward pass")
    warmup_steps: int = param(100, help="warm-up steps on the clean loss (official: 5 epochs of 2,500 images in "
                              "batches of 128)", min=0, max=100000)
    warmup_lr: float = param(1e-4, help="SGD learning rate of the warm-up", min=0.0, max=1.0)
    steps: int = param(1000, help="bi-level steps (official: 50 epochs of 2,500 images in batches of 128)", min=1,
                       max=100000)
    batch_size: int = param(128, help="images per step", min=1, max=4096)
    lr: float = param(0.01, help="SGD learning rate of the polarizer (constant)", min=1e-6, max=1.0)
    momentum: float = param(0.9, help="SGD momentum", min=0.0, max=0.999)
    weight_decay: float = param(5e-4, help="L2 weight decay of the polarizer", min=0.0, max=0.1)
    radius: float = param(0.0, help="L2 radius of the targeted perturbation in pixel units; 0 = 3.0 on 3 x 32 x 32 "
                          "scaled to the input size", min=0.0, max=1000.0)
    adv_lr: float = param(0.1, help="signed step of the targeted attack (pixel units)", min=0.0, max=10.0)
    inner_steps: int = param(2, help="most attack steps per batch (stops when > 60% reach the target)", min=1,
                             max=100)
    lmd1: float = param(1.0, help="weight of the clean cross-entropy", min=0.0, max=100.0)
    lmd2: float = param(0.4, help="weight of CE(f(x + delta), clean prediction)", min=0.0, max=100.0)
    lmd3: float = param(0.4, help="weight of -log(1 - p(top wrong class of x + delta))", min=0.0, max=100.0)
    lmd4: float = param(0.4, help="weight of -log(1 - p(attack target of x + delta))", min=0.0, max=100.0)
    augment: str = param("none", help="augmentation of the pool images (official: none)",
                         choices=("none", "crop", "crop-flip"))


class Polarizer(nn.Module):
    """The official ``convbn`` structure: a 1x1 convolution C -> C without bias (identity init) and a BatchNorm2d."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels)[:, :, None, None])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(z))

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c): the eval-mode polarizer is z -> M z + c per pixel."""
        bn = self.bn
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return a[:, None] * self.conv.weight[:, :, 0, 0], bn.bias - a * bn.running_mean


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, BatchNorm2d) names where the BatchNorm's input *is* the convolution's output, in forward order
    (one pass on ``x``); grouped convolutions are left out (their channels cannot be mixed by a fold)."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors are kept alive so their ids stay unique
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            handles.append(m.register_forward_hook(
                lambda mod, i, o, name=name: outputs.__setitem__(id(o), (name, o))))
        elif isinstance(m, nn.BatchNorm2d):
            def pre(mod, inputs, name=name):
                hit = outputs.get(id(inputs[0]))
                if hit is not None and hit[1] is inputs[0]:
                    pairs.append((hit[0], name))
            handles.append(m.register_forward_pre_hook(pre))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return pairs


@torch.no_grad()
def fold(model: nn.Module, conv_name: str, bn_name: str, pol: Polarizer) -> None:
    """Fold the eval-mode polarizer on ``conv_name``'s output into that convolution and the BatchNorm it feeds."""
    modules = dict(model.named_modules())
    conv, bn = modules[conv_name], modules[bn_name]
    mat, shift = pol.affine()
    mat, shift = mat.to(conv.weight), shift.to(conv.weight)
    conv.weight.copy_(torch.einsum("oc,cihw->oihw", mat, conv.weight))
    if conv.bias is not None:
        conv.bias.copy_(mat @ conv.bias + shift)
    else:
        bn.running_mean.sub_(shift.to(bn.running_mean))


@torch.no_grad()
def fold_error(model: nn.Module, conv_name: str, bn_name: str, x: torch.Tensor) -> float:
    """Largest logit difference, relative to the largest logit + 1, between a copy of ``model`` with a random
    polarizer hooked on ``conv_name`` and the same copy with it folded (0 up to rounding when the fold is exact)."""
    import copy

    work = copy.deepcopy(model).eval()
    conv = dict(work.named_modules())[conv_name]
    gen = torch.Generator().manual_seed(0)
    pol = Polarizer(conv.out_channels)
    c = conv.out_channels
    pol.conv.weight.add_(0.1 * torch.randn(c, c, 1, 1, generator=gen))
    pol.bn.bias.copy_(0.5 * torch.randn(c, generator=gen))
    pol.bn.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
    pol = pol.to(conv.weight.device).eval()
    handle = conv.register_forward_hook(lambda m, i, o: pol(o))
    try:
        hooked = work(x).float()
    finally:
        handle.remove()
    fold(work, conv_name, bn_name, pol)
    return float((hooked - work(x).float()).abs().max()) / (float(hooked.abs().max()) + 1.0)


def _radius(params: NPDParams, shape: tuple[int, ...]) -> float:
    return params.radius if params.radius > 0 else 3.0 * math.sqrt(math.prod(shape) / 3072.0)


def targeted_l2_attack(model: nn.Module, x: torch.Tensor, target: torch.Tensor, radius: float, step: float,
                       steps: int) -> torch.Tensor:
    """The official NPD inner attack: delta from 0, signed steps minimising the clamped CE to ``target``, each
    projected onto the L2 ball of ``radius``; stop once more than 60% of the batch reaches its target."""
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), target, reduction="none").clamp(-LOSS_BOUND,
                                                                                               LOSS_BOUND).mean()
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta - step * grad.sign()
            norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            delta = delta * torch.clamp(radius / norm, max=1.0)
            hit = (model((x + delta).clamp(0, 1)).argmax(1) == target).float().mean()
        if float(hit) > SUCCESS_SHARE:
            break
    return delta.detach()


def polarizer_losses(logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, clean_pred: torch.Tensor,
                     target: torch.Tensor, params: NPDParams) -> dict[str, torch.Tensor]:
    """The four terms of the official objective (before their weights)."""
    p = adv_logits.softmax(1)
    top2 = p.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])

    def push_down(cls: torch.Tensor) -> torch.Tensor:
        return -torch.log(1.0001 - p.gather(1, cls[:, None])[:, 0] + 1e-12).mean()

    return {"clean": F.cross_entropy(logits, y), "adv_consistency": F.cross_entropy(adv_logits, clean_pred),
            "adv_top_wrong": push_down(wrong), "adv_target": push_down(target)}


@register_defense
class NPD(Defense):
    name = "npd"
    title = "Neural Polarizer (NPD)"
    paper = "Zhu et al., NeurIPS 2023 (arXiv 2306.16697)"
    order = 93
    needs = ("batchnorm", "convolutions", "module_hooks", "rebuildable", "trainable")
    summary = ("Inserts one learnable linear layer (a 1x1 convolution and BatchNorm) into the frozen model and "
               "trains it alone, against targeted perturbations of clean images, to pass benign features and "
               "block trigger features; the trained layer is folded into the network's weights.")
    threat = ThreatModel(clean_pool=True)
    Params = NPDParams
    presets = {"quick": {"warmup_steps": 10, "steps": 150, "batch_size": 64, "radius": 3.0}, "paper": {}}
    curve_labels = {"passes": "Polarizer training: loss and held-out pool BA / ASR per pass"}

    def repair(self, model, params: NPDParams, ctx: RepairContext) -> DefenseOutput:
        pool, device = ctx.pool, ctx.device
        x = pool.x
        if len(x) < 1:
            raise ValueError("NPD needs at least one image in the pool's training part")
        probe = to_device(x[:8], device)
        pairs = conv_bn_pairs(model, probe)
        if not any((params.lmd1, params.lmd2, params.lmd3, params.lmd4)):
            raise ValueError("NPD: at least one of lmd1 ... lmd4 must be positive")
        conv_name, bn_name = self._place(model, pairs, params.layer, probe)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        conv = dict(model.named_modules())[conv_name]
        pol = Polarizer(conv.out_channels).to(device)
        handle = conv.register_forward_hook(lambda m, i, o: pol(o))
        try:
            losses, curve = self._train(model, pol, params, ctx)
        finally:
            handle.remove()
        pol.eval()
        check = to_device(pool.x_val[:256] if len(pool.x_val) else x[:256], device)
        with torch.no_grad():
            handle = conv.register_forward_hook(lambda m, i, o: pol(o))
            try:
                hooked = model(check).float()
            finally:
                handle.remove()
            fold(model, conv_name, bn_name, pol)
            folded = model(check).float()
        err = float((hooked - folded).abs().max())
        scale = float(hooked.abs().max()) + 1.0
        if not err <= 1e-3 * scale:
            raise RuntimeError(f"NPD: the polarizer on {conv_name} does not fold into the network exactly (largest "
                               f"logit difference {err:.3g}); choose another layer")
        mat, _ = pol.affine()
        eye = torch.eye(len(mat), device=mat.device)
        return DefenseOutput(model.eval(), {
            "layer": conv_name,
            "folded_into": [conv_name, bn_name],
            "fold_error": err,
            "radius": _radius(params, tuple(x.shape[1:])),
            "polarizer_distance_from_identity": float((mat - eye).norm() / eye.norm()),
            "held_out_ba_after": pool_accuracy(model, pool.x_val, pool.y_val, device),
        }, {"loss": losses, "passes": curve})

    @staticmethod
    def _place(model: nn.Module, pairs: list[tuple[str, str]], layer: str, probe: torch.Tensor) -> tuple[str, str]:
        """The (convolution, BatchNorm) pair the polarizer goes on: ``layer``'s, or with ``auto`` the last pair of
        the forward pass whose fold is exact (checked with a random polarizer, :func:`fold_error`)."""
        if not pairs:
            raise ValueError("NPD: no convolution of this model feeds a BatchNorm2d directly, so the polarizer "
                             "cannot be folded into it")
        if layer == "auto":
            for conv_name, bn_name in reversed(pairs):
                if fold_error(model, conv_name, bn_name, probe) <= 1e-3:
                    return conv_name, bn_name
            raise ValueError("NPD: no convolution's output feeds only a BatchNorm2d, so the polarizer cannot be "
                             "folded into this model exactly")
        for conv_name, bn_name in pairs:
            if conv_name == layer:
                err = fold_error(model, conv_name, bn_name, probe)
                if not err <= 1e-3:
                    raise ValueError(f"NPD: a polarizer on {conv_name} cannot be folded into the network exactly "
                                     f"(its output is used beyond {bn_name}; trial difference {err:.3g}); choose "
                                     "another layer")
                return conv_name, bn_name
        raise ValueError(f"NPD: layer {layer!r} is not a convolution feeding a BatchNorm2d; choose one of "
                         f"{', '.join(c for c, _ in pairs[-6:])}{' ...' if len(pairs) > 6 else ''}")

    def _train(self, model: nn.Module, pol: Polarizer, params: NPDParams, ctx: RepairContext):
        pool, device = ctx.pool, ctx.device
        x, y = pool.x, pool.y
        gen = torch.Generator().manual_seed(int(ctx.seed))
        bs = min(params.batch_size, len(x))
        per_pass = -(-len(x) // bs)
        radius = _radius(params, tuple(x.shape[1:]))
        measure = pool_monitor(model, pool, ctx.trigger, device)
        total = params.warmup_steps + params.steps
        curve: list[dict] = []

        def monitor() -> dict:
            was = pol.training
            pol.eval()
            try:
                return measure()
            finally:
                pol.train(was)

        def batches(epoch: int):
            perm = torch.randperm(len(x), generator=gen)
            for s in range(0, len(perm), bs):
                idx = perm[s:s + bs]
                yield to_device(augment_batch(x[idx], params.augment, gen), device), y[idx].to(device)

        def tick(step: FitStep) -> None:
            ctx.check_cancel()

        def reporter(phase: str, done_before: int, steps: int):
            def end_epoch(epoch: int, loss: float) -> None:
                done = min(steps, (epoch + 1) * per_pass)
                row = {"step": done_before + done, "phase": phase, "loss": loss, **monitor()}
                curve.append(row)
                ctx.tick((done_before + done) / max(1, total), f"{phase}: step {done}/{steps}",
                         {k: v for k, v in row.items() if k not in ("phase", "step")})
            return end_epoch

        def clean_loss(batch):
            xb, yb = batch
            return F.cross_entropy(model(xb), yb), len(yb)

        if params.warmup_steps:
            pol.train()  # the official warm-up: the polarizer's BatchNorm in train mode
            opt = torch.optim.SGD(pol.parameters(), lr=params.warmup_lr)
            fit(model, batches, clean_loss, opt, device=device, epochs=-(-params.warmup_steps // per_pass),
                train_mode=False, max_steps=params.warmup_steps, tick=tick,
                end_epoch=reporter("warm-up", 0, params.warmup_steps))
        pol.eval()
        opt = torch.optim.SGD(pol.parameters(), lr=params.lr, momentum=params.momentum,
                              weight_decay=params.weight_decay)

        def bilevel_batches(epoch: int):
            for xb, yb in batches(epoch):
                with torch.no_grad():
                    clean_logits = model(xb).float()
                clean_pred = clean_logits.argmax(1)
                target = clean_logits.scatter(1, yb[:, None], float("-inf")).argmax(1)
                delta = targeted_l2_attack(model, xb, target, radius, params.adv_lr, params.inner_steps)
                yield xb, yb, (xb + delta).clamp(0, 1), clean_pred, target

        weights = {"clean": params.lmd1, "adv_consistency": params.lmd2, "adv_top_wrong": params.lmd3,
                   "adv_target": params.lmd4}

        def bilevel_loss(batch):
            xb, yb, x_adv, clean_pred, target = batch
            logits, adv_logits = model(torch.cat([xb, x_adv])).float().split(len(yb))
            terms = polarizer_losses(logits, adv_logits, yb, clean_pred, target, params)
            return sum(weights[k] * v for k, v in terms.items() if weights[k]), len(yb)

        losses = fit(model, bilevel_batches, bilevel_loss, opt, device=device, epochs=-(-params.steps // per_pass),
                     train_mode=False, max_steps=params.steps, tick=tick,
                     end_epoch=reporter("polarizer", params.warmup_steps, params.steps))
        return losses, curve
