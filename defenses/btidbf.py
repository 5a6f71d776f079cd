"""BTI-DBF(U): Backdoor Trigger Inversion via Decoupling Benign Features, with unlearning. Xu, Huang, Li, Qin & Ren,
"Towards Reliable and Efficient Backdoor Trigger Inversion via Decoupling Benign Features", ICLR 2024 (spotlight,
OpenReview Tw9wemV6cb); official code ``xuxiong0214/BTIDBF`` (``pretrain.py``, ``btidbfu.py``, ``evaluate.py``,
``cfg.py``; the UNet and mask modules read in the HKUST fork ``AISafety-HKUST/stable_backdoor_purification``
``fine_tune/BTIDBF/models``), read, not copied.

Neural Cleanse (:mod:`analysis.reverse`) searches for a small patch per class; BTI-DBF instead learns a *generator*
G that turns any clean image into a poisoned-looking one, without guessing the trigger's form or the target class,
by splitting the model's last feature map into benign and backdoor parts:

0. **Pre-train G** (a UNet) towards the identity on the clean pool: soft cross-entropy between the suspect's
   predictions on x and G(x), + feature MSE, + pixel MSE weighted 100 while it is above ``pretrain_bound``, else 0.01
   (``preround`` epochs, Adam ``gen_lr``).
1. **Decouple** (``mround`` epochs, Adam lr ``mask_lr`` on a copy of the current model in train mode): a mask
   m = tanh(p)/2 + 0.5 (p ~ N(0, 1)) on the feature map phi(x) (the input of the pooled classifier) so that
   m * phi alone classifies the clean pool and (1 - m) * phi does not: minimise CE(h(m phi), y) - CE(h((1-m) phi), y).
   m marks the benign features.
2. **Invert** (``uround`` epochs, Adam ``gen_lr``; the copy in eval mode): while the pixel MSE(x, G(x)) exceeds
   ``norm_bound`` or the benign-feature MSE exceeds ``feat_bound``, minimise the pixel MSE; otherwise minimise
   -MSE((1-m) phi(x), (1-m) phi(G(x))) + 0.01 MSE(m phi(x), m phi(G(x))): keep the benign features and move the
   others as far as possible. From the second round on, add CE(f(G(x)), t), t the detected target.
3. After the first round, t = the majority prediction of the model on G(x + 0.03 N(0, 1)) over the pool.
4. **Unlearn** (``ul_round`` epochs, Adam ``unlearn_lr``, model in train mode, persistent across rounds): in every
   batch, int(``gen_share`` B + 1) images are replaced by G(x); loss CE(f(x'), y) + MSE(phi(x), phi(x')).
5. Steps 1-4 are repeated ``nround`` times (G and both Adam optimisers persist; the mask starts afresh each round).
   The last model is returned.

Official defaults (``cfg.py``, the README's ResNet-18 commands): batch 128, preround 50, gen_lr 1e-3, mround 20,
uround 30, norm_bound 0.3, feat_bound 3, nround 5, ul_round 30, Adam 1e-4 for unlearning, 5% of CIFAR-10's training
set, crop + flip. These are the ``paper`` preset.

The run records the detected target (and, from the suspect's known trigger, which the method never uses, whether it
is the attack's), the inverted images' success on the held-out pool (the share of images of other classes that the
model, before that round's unlearning, assigns to the detected target), the mask's benign share and the mean
pixel MSE of G.

Deviations from the official code:
- **Units of the bounds.** The official images are normalised (CIFAR-10 std ~0.2) before G and the model; ours are
  [0, 1] pixels and the model normalises inside. Every image MSE (the losses and ``norm_bound`` 0.3,
  ``pretrain_bound`` 0.1) is computed as the pixel MSE divided by ``bound_std``^2 (0.2^2), i.e. in the official units
  on CIFAR-10, whatever the suspect's own normalisation: the allowed change of an image stays the same in pixels
  (RMS ~0.11 at 0.3). ``feat_bound`` is in the model's feature units, as in the official code.
- **Pre-training loss.** The official ``CrossEntropyLoss(softmax(f(x)), softmax(f(G(x))))`` takes the clean
  probabilities as *logits* and the generated probabilities as the target; ours is the intended soft cross-entropy
  -sum softmax(f(x)) log softmax(f(G(x))).
- **Generator.** A UNet of ``gen_blocks`` encoder / decoder levels with ``gen_filters`` filters at the first (doubled
  per level, at most 512), 3x3 conv + BatchNorm + LeakyReLU pairs, max-pool down, transposed-conv up, 1x1 output conv
  with no output activation (as the official UNet); a decoder map is resized to its skip connection's size when an
  odd size was halved (28 x 28 inputs), and the block's norm layer is our choice (the official block file was not
  available). ``residual`` (off in ``paper``, on in ``quick``) makes G(x) = x + UNet(x) with the output layer's
  initial weights scaled by 0.1: G starts near the identity that the 50 pre-training epochs aim at, which a short
  run cannot afford. (A zero-initialised output layer, tried first, starts G *at* the identity, where the inversion's
  feature-distance gradients vanish: on demo:badnets the generator did not move in round 1, image MSE 0.0002.)
- **Model split.** phi is the model's last feature map (``forward_features``; the official ResNet's ``layer4``
  output) and h its pooled classifier, so the defense needs a model whose head average-pools a feature map into a
  linear layer. The decoupling copy's parameters are frozen (only the mask is optimised; the official code builds
  their gradients and never uses them).
- The target is detected on the pool without augmentation (the official code uses its augmented training loader);
  ``earlystop`` (off by default, as official) stops the rounds when a later detection disagrees.
- The clean data is the defense pool's training part (official: 5% of CIFAR-10's training set, 2,500 images).
- ``quick`` preset (two CPU minutes on the demo): a residual 2-level UNet with 16 filters, batches of 32 (more steps
  for the same work: 22 per epoch of the 700-image pool), preround 5, nround 2, mround 3 with mask_lr 0.05, uround 6
  with gen_lr 0.01, ul_round 5 (Adam 1e-4), augmentation ``crop`` (the demo suspects were trained without flips).
  Kept after the choice on the zoo's development suspects (``scripts/choose_presets.py``, docs/preset-choice.md;
  gen_lr 0.01 or 0.005, and preround 8 with uround 4, one suspect per attack, 45-54 s a trial): it removed BadNets
  (dev ASR 0.008 at a BA drop of 0.008) and brought WaNet to 0.093, with the lowest mean ASR + BA drop; Blended
  (0.985) and SIG (0.710) stay. Before that, measured once on demo:badnets (seed 0, test split, one core of a loaded
  machine): 101 s CPU (235 s wall); the generator reached the image-MSE bound (0.28 of 0.3) in round 1, but the vote
  picked class 8 (shares: 8 0.32, 2 0.24, 0 0.21; the attack's target is 0), so round 2 inverted class 8 and the
  unlearning missed the backdoor: BA 0.905 -> 0.879, ASR 0.997 -> 0.936. Earlier tries, batch 128 and gen_lr 1e-3
  (preround 10, mask_lr 0.1): 105 s CPU, target 4, ASR 0.996 (with the zero-initialised residual output, see above).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import to_device
from suspects.models import ModelInterfaceError, model_api
from suspects.training import FitStep, augment_batch, fit

from .base import Defense, DefenseOutput, ThreatModel, param
from .common import pool_monitor
from .context import RepairContext
from .registry import register_defense
from .retrain import StageClock

__all__ = ["BTIDBF", "BTIDBFParams", "UNetGenerator", "features", "head_from_features", "benign_mask",
           "pretrain_generator", "decouple", "invert", "detect_target", "unlearn_with_generator", "inverted_success"]


@dataclass
class BTIDBFParams:
    preround: int = param(50, help="epochs of pre-training the generator towards the identity", min=0, max=10000)
    gen_lr: float = param(1e-3, help="Adam learning rate of the generator (pre-training and inversion)",
                          min=1e-7, max=1.0)
    mround: int = param(20, help="epochs of the benign-feature mask (decoupling) per round", min=1, max=10000)
    mask_lr: float = param(0.01, help="Adam learning rate of the mask", min=1e-6, max=10.0)
    uround: int = param(30, help="epochs of trigger inversion (generator training) per round", min=1, max=10000)
    norm_bound: float = param(0.3, help="image MSE above which the inversion only pulls G(x) back to x (official "
                                        "units: MSE of CIFAR-normalised images, see bound_std)", min=0.0, max=100.0)
    feat_bound: float = param(3.0, help="benign-feature MSE above which the inversion only pulls G(x) back to x "
                                        "(model feature units)", min=0.0, max=1e6)
    pretrain_bound: float = param(0.1, help="pre-training: image MSE above which the pixel term weighs 100 (else "
                                            "0.01), official units", min=0.0, max=100.0)
    bound_std: float = param(0.2, help="image MSEs are pixel MSEs / bound_std^2: the official bounds were set on "
                                       "CIFAR-10 images normalised with std ~0.2", min=1e-3, max=10.0)
    nround: int = param(5, help="rounds of decouple -> invert -> unlearn", min=1, max=1000)
    ul_round: int = param(30, help="unlearning epochs per round", min=0, max=10000)
    unlearn_lr: float = param(1e-4, help="Adam learning rate of the model while unlearning", min=1e-8, max=1.0)
    gen_share: float = param(0.1, help="share of each unlearning batch replaced by generated images "
                                       "(int(gen_share * B + 1) images)", min=0.0, max=1.0)
    target_noise: float = param(0.03, help="std of the Gaussian noise added to the pool images before G when the "
                                           "target class is detected (pixel units)", min=0.0, max=1.0)
    earlystop: bool = param(False, help="stop the rounds when a later target detection disagrees with the first "
                                        "(official option, off by default)")
    batch_size: int = param(128, help="images per step", min=2, max=8192)
    gen_filters: int = param(32, help="filters of the generator's first UNet level (doubled per level, at most 512)",
                             min=2, max=512)
    gen_blocks: int = param(4, help="encoder / decoder levels of the generator's UNet", min=1, max=8)
    residual: bool = param(False, help="generator G(x) = x + UNet(x) with a small initial output layer, so it starts "
                                       "near the identity that pre-training aims at (not in the official code)")
    augment: str = param("crop-flip", help="augmentation of the pool images in every stage (official: crop + flip)",
                         choices=("none", "crop", "crop-flip"))


# --- the generator ---------------------------------------------------------------------------------------------


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01))


class UNetGenerator(nn.Module):
    """Image -> image UNet (same channels and size): ``blocks`` levels of two 3x3 convolutions, max-pooling down,
    a bottleneck of twice the last level's filters, transposed convolutions up with skip connections, 1x1 output.
    ``residual``: G(x) = x + UNet(x) with the output convolution's initial weights scaled by 0.1, so G starts near
    (not at) the identity: at exactly the identity every feature-distance gradient of the inversion is zero."""

    def __init__(self, channels: int, base: int = 32, blocks: int = 4, residual: bool = False):
        super().__init__()
        self.residual = residual
        widths = [min(base * 2 ** i, 512) for i in range(blocks)]
        self.down = nn.ModuleList()
        c = channels
        for w in widths:
            self.down.append(_conv_block(c, w))
            c = w
        self.bottleneck = _conv_block(c, 2 * c)
        c = 2 * c
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.merge.append(_conv_block(2 * w, w))
            c = w
        self.out = nn.Conv2d(c, channels, 1)
        if residual:
            with torch.no_grad():
                self.out.weight.mul_(0.1)
                self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = F.max_pool2d(h, 2) if min(h.shape[-2:]) >= 2 else h
        h = self.bottleneck(h)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            h = up(h)
            if h.shape[-2:] != skip.shape[-2:]:  # an odd size was halved on the way down (28 -> 14 -> 7 -> 3)
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = merge(torch.cat([h, skip], dim=1))
        return x + self.out(h) if self.residual else self.out(h)


# --- the model split into a feature map and its pooled classifier ---------------------------------------------------


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """phi(x): the last feature map (N, C, h, w) of raw [0, 1] images."""
    return model_api(model).forward_features(x)


def head_from_features(model: nn.Module, feat: torch.Tensor) -> torch.Tensor:
    """h(phi): the model's head on a (masked) feature map; global average pooling into the classifier for a library
    model whose head is not run apart from its body (the ``pooled_head`` capability)."""
    api = model_api(model)
    try:
        return api.forward_head(feat)
    except ModelInterfaceError:
        return api.get_classifier()(feat.float().mean(dim=(2, 3)))


def benign_mask(theta: torch.Tensor) -> torch.Tensor:
    """m = tanh(theta) / 2 + 0.5, in (0, 1) (the official code divides by 2 + 1e-7)."""
    return torch.tanh(theta) / (2 + 1e-7) + 0.5


def _image_mse(a: torch.Tensor, b: torch.Tensor, p: BTIDBFParams) -> torch.Tensor:
    """Pixel MSE in the official (CIFAR-normalised) units."""
    return F.mse_loss(a.float(), b.float()) / p.bound_std ** 2


def _frozen(model: nn.Module) -> nn.Module:
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def _pool_batches(x: torch.Tensor, y: torch.Tensor, p: BTIDBFParams, gen: torch.Generator, device):
    def batches(epoch: int):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(perm), p.batch_size):
            idx = perm[s:s + p.batch_size]
            if len(idx) >= 2:  # BatchNorm in train mode needs two images
                yield to_device(augment_batch(x[idx], p.augment, gen), device), y[idx].to(device)
    return batches


def _steps_per_epoch(n: int, bs: int) -> int:
    return max(1, n // bs + (1 if n % bs >= 2 else 0))


def _ticker(tick, label: str, epochs: int, n: int, bs: int):
    total = max(1, epochs * _steps_per_epoch(n, bs))

    def on_step(s: FitStep) -> None:
        if tick is not None:
            tick(s.step / total, f"{label}: epoch {s.epoch + 1}/{epochs}")
    return on_step


# --- the stages ---------------------------------------------------------------------------------------------------


def pretrain_generator(gen_net: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device,
                       p: BTIDBFParams, opt: torch.optim.Optimizer, gen: torch.Generator, tick=None) -> list[float]:
    """Step 0: G towards the identity for ``p.preround`` epochs (``model`` frozen, eval mode)."""
    model.eval()

    def loss_fn(batch):
        xb, _ = batch
        g = gen_net(xb)
        with torch.no_grad():
            f_x = features(model, xb)
            p_x = F.softmax(head_from_features(model, f_x).float(), dim=1)
        f_g = features(model, g)
        soft_ce = -(p_x * F.log_softmax(head_from_features(model, f_g).float(), dim=1)).sum(1).mean()
        norm = _image_mse(xb, g, p)
        weight = 100.0 if float(norm.detach()) > p.pretrain_bound else 0.01
        return soft_ce + F.mse_loss(f_g.float(), f_x.float()) + weight * norm, len(xb)

    return fit(gen_net, _pool_batches(x, y, p, gen, device), loss_fn, opt, device=device, epochs=p.preround,
               tick=_ticker(tick, "pre-training the generator", p.preround, len(y), p.batch_size))


def decouple(inv: nn.Module, x: torch.Tensor, y: torch.Tensor, device, p: BTIDBFParams, gen: torch.Generator,
             tick=None) -> tuple[torch.Tensor, list[float]]:
    """Step 1: the benign-feature mask on a frozen copy ``inv`` of the model (train mode, as the official code).
    Returns the mask (1, C, h, w) in (0, 1) and the per-epoch losses."""
    with torch.no_grad():
        shape = features(inv.eval(), to_device(x[:1], device)).shape
    theta = nn.Parameter(torch.randn(shape, generator=gen).to(device))
    opt = torch.optim.Adam([theta], lr=p.mask_lr)

    def loss_fn(batch):
        xb, yb = batch
        feat = features(inv, xb)
        m = benign_mask(theta).to(feat.dtype)
        pos = F.cross_entropy(head_from_features(inv, m * feat).float(), yb)
        neg = F.cross_entropy(head_from_features(inv, (1 - m) * feat).float(), yb)
        return pos - neg, len(yb)

    losses = fit(inv, _pool_batches(x, y, p, gen, device), loss_fn, opt, device=device, epochs=p.mround,
                 tick=_ticker(tick, "decoupling benign features", p.mround, len(y), p.batch_size))
    inv.eval()
    return benign_mask(theta).detach(), losses


def invert(gen_net: nn.Module, inv: nn.Module, mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor, device,
           p: BTIDBFParams, opt: torch.optim.Optimizer, gen: torch.Generator, target: int | None = None,
           tick=None) -> list[dict]:
    """Step 2: train G against the frozen copy ``inv`` (eval mode) with the decoupled mask; with ``target``, also
    pull f(G(x)) to it. Returns per-epoch means of the loss terms."""
    inv.eval()
    rows: list[dict] = []

    def batches(epoch: int):
        rows.append({"epoch": epoch + 1, "loss": 0.0, "benign": 0.0, "backdoor": 0.0, "norm": 0.0, "n": 0})
        yield from _pool_batches(x, y, p, gen, device)(epoch)

    def loss_fn(batch):
        xb, yb = batch
        g = gen_net(xb)
        with torch.no_grad():
            f_x = features(inv, xb).float()
        f_g = features(inv, g).float()
        m = mask.float()
        benign = F.mse_loss(m * f_x, m * f_g)
        backdoor = F.mse_loss((1 - m) * f_x, (1 - m) * f_g)
        norm = _image_mse(xb, g, p)
        if float(norm.detach()) > p.norm_bound or float(benign.detach()) > p.feat_bound:
            loss = norm
        else:
            loss = -backdoor + 0.01 * benign
        if target is not None:
            loss = loss + F.cross_entropy(head_from_features(inv, f_g.to(f_x.dtype)).float(),
                                          torch.full_like(yb, int(target)))
        row, b = rows[-1], len(yb)
        for k, v in (("loss", loss), ("benign", benign), ("backdoor", backdoor), ("norm", norm)):
            row[k] += float(v.detach()) * b
        row["n"] += b
        return loss, b

    fit(gen_net, batches, loss_fn, opt, device=device, epochs=p.uround,
        tick=_ticker(tick, "inverting the trigger", p.uround, len(y), p.batch_size))
    gen_net.eval()
    out = []
    for r in rows:
        n = max(r.pop("n"), 1)
        out.append({k: (v / n if k != "epoch" else v) for k, v in r.items()})
    return out


@torch.no_grad()
def _generate(gen_net: nn.Module, x: torch.Tensor, device, noise: float = 0.0, gen: torch.Generator | None = None,
              batch_size: int = 256) -> torch.Tensor:
    gen_net.eval()
    out = []
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        if noise:
            xb = xb + noise * torch.randn(xb.shape, generator=gen)
        out.append(gen_net(to_device(xb, device)).float().cpu())
    return torch.cat(out) if out else x[:0]


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(to_device(x[s:s + batch_size], device)).argmax(1).cpu()
                      for s in range(0, len(x), batch_size)]) if len(x) else torch.empty(0, dtype=torch.long)


def detect_target(model: nn.Module, gen_net, x: torch.Tensor, device, noise: float = 0.03,
                  gen: torch.Generator | None = None, num_classes: int | None = None) -> tuple[int, list[float]]:
    """Step 3: the class the model predicts most often on G(x + noise N(0, 1)) (``gen_net`` any image -> image
    callable module), and the share of each class."""
    generated = _generate(gen_net, x, device, noise, gen) if isinstance(gen_net, nn.Module) else gen_net(x)
    preds = _predict(model, generated, device)
    k = num_classes or int(preds.max()) + 1
    counts = torch.bincount(preds, minlength=k).float()
    return int(counts.argmax()), (counts / counts.sum().clamp_min(1)).tolist()


def inverted_success(model: nn.Module, gen_net: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int,
                     device) -> float | None:
    """Share of the images of classes other than ``target`` that ``model`` assigns to ``target`` on G(x)."""
    keep = y != target
    if not keep.any():
        return None
    preds = _predict(model, _generate(gen_net, x[keep], device), device)
    return float((preds == target).float().mean())


def unlearn_with_generator(model: nn.Module, gen_net, x: torch.Tensor, y: torch.Tensor, device, p: BTIDBFParams,
                           opt: torch.optim.Optimizer, gen: torch.Generator, epochs: int | None = None,
                           tick=None) -> list[float]:
    """Step 4: ``epochs`` (default ``p.ul_round``) epochs of CE(f(x'), y) + MSE(phi(x), phi(x')) where x' replaces
    int(gen_share B + 1) images of each batch by G(x) (model in train mode). ``gen_net``: the generator (eval mode),
    or any callable image -> image (a known trigger, in tests)."""
    epochs = p.ul_round if epochs is None else epochs
    if isinstance(gen_net, nn.Module):
        gen_net.eval()

    def loss_fn(batch):
        xb, yb = batch
        k = min(len(yb), int(p.gen_share * len(yb) + 1))
        idx = torch.randperm(len(yb), generator=gen)[:k].to(xb.device)
        x2 = xb.clone()
        with torch.no_grad():
            x2[idx] = gen_net(xb[idx]).to(xb.dtype)
        f_x = features(model, xb)
        f_2 = features(model, x2)
        loss = F.cross_entropy(head_from_features(model, f_2).float(), yb) + F.mse_loss(f_x.float(), f_2.float())
        return loss, len(yb)

    losses = fit(model, _pool_batches(x, y, p, gen, device), loss_fn, opt, device=device, epochs=epochs,
                 tick=_ticker(tick, "unlearning the inverted trigger", epochs, len(y), p.batch_size))
    model.eval()
    return losses


@register_defense
class BTIDBF(Defense):
    name = "btidbf"
    title = "Backdoor Trigger Inversion via Decoupling Benign Features (BTI-DBF)"
    paper = "Xu et al., ICLR 2024 (OpenReview Tw9wemV6cb)"
    order = 95
    needs = ("feature_map", "pooled_head", "module_hooks", "rebuildable", "trainable")
    summary = ("Splits the model's last feature map into benign and backdoor parts with a learned mask, trains a "
               "generator whose images keep the benign features and change the others as much as possible (an "
               "inverted trigger, with no guess of its form or target), then fine-tunes the model to classify the "
               "generated images correctly (BTI-DBF(U)); repeated for a few rounds.")
    threat = ThreatModel(clean_pool=True)
    Params = BTIDBFParams
    presets = {"quick": {"gen_filters": 16, "gen_blocks": 2, "residual": True, "preround": 5, "nround": 2,
                         "mround": 3, "mask_lr": 0.05, "uround": 6, "ul_round": 5, "batch_size": 32, "gen_lr": 0.01,
                         "augment": "crop"},
               "paper": {}}
    artifact_labels = {"detected_target": "target class detected from the inverted images",
                       "target_correct": "the detected target is the attack's (from the known trigger; never used)",
                       "inverted_success": "share of held-out images of other classes the suspect assigns to the "
                                           "detected target on G(x) (first round)"}
    curve_labels = {"pretrain": "pre-training the generator: loss",
                    "rounds": "per round: mask loss, inversion terms, inverted success, held-out BA / ASR"}

    def repair(self, model, params: BTIDBFParams, ctx: RepairContext) -> DefenseOutput:
        pool, device = ctx.pool, ctx.device
        x, y = pool.x, pool.y
        if len(y) < 2:
            raise ValueError("BTI-DBF needs at least two pool images to train on")
        gen = torch.Generator().manual_seed(int(ctx.seed) + 71)
        torch.manual_seed(int(ctx.seed) + 71)  # the generator's initial weights
        n = len(y)
        num_classes = int(model_api(model).get_classifier().out_features)
        rnd_cost = params.mround * n + params.uround * n * 3 + params.ul_round * n * 3
        costs = {"pretrain": params.preround * n * 3, **{f"round{r}": rnd_cost for r in range(params.nround)}}
        clock = StageClock(ctx, costs)

        for q in model.parameters():
            q.requires_grad_(True)
        gen_net = UNetGenerator(int(x.shape[1]), params.gen_filters, params.gen_blocks, params.residual).to(device)
        opt_g = torch.optim.Adam(gen_net.parameters(), lr=params.gen_lr)
        opt_m = torch.optim.Adam(model.parameters(), lr=params.unlearn_lr)
        monitor = pool_monitor(model, pool, ctx.trigger, device)

        frozen = _frozen(copy.deepcopy(model)).eval()
        pre = pretrain_generator(gen_net, frozen, x, y, device, params, opt_g, gen,
                                 tick=lambda f, m: clock.tick("pretrain", f, m)) if params.preround else []
        del frozen
        clock.tick("pretrain", 1.0, "generator pre-trained", {"pretrain_loss": pre[-1]} if pre else {})

        target: int | None = None
        shares: list[float] = []
        first_success = None
        rows: list[dict] = []
        a, b = params.mround * n / rnd_cost, params.uround * n * 3 / rnd_cost  # shares of a round's work

        def part(stage: str, label: str, lo: float, width: float):
            return lambda f, m: clock.tick(stage, lo + width * f, f"{label} {m}")

        for r in range(params.nround):
            stage = f"round{r}"
            label = f"round {r + 1}/{params.nround}"
            inv = _frozen(copy.deepcopy(model))
            mask, mask_losses = decouple(inv, x, y, device, params, gen, tick=part(stage, label, 0.0, a))
            inv_rows = invert(gen_net, inv, mask, x, y, device, params, opt_g, gen, target=target,
                              tick=part(stage, label, a, b))
            del inv
            stop = False
            if r == 0:
                target, shares = detect_target(model, gen_net, x, device, params.target_noise, gen, num_classes)
            elif params.earlystop:
                checked, _ = detect_target(model, gen_net, x, device, params.target_noise, gen, num_classes)
                stop = checked != target
            success = inverted_success(model, gen_net, pool.x_val, pool.y_val, int(target), device)
            if r == 0:
                first_success = success
            row = {"round": r + 1, "mask_loss": mask_losses[-1], "mask_benign_share": float(mask.mean()),
                   "inversion_loss": inv_rows[-1]["loss"], "benign_feature_mse": inv_rows[-1]["benign"],
                   "backdoor_feature_mse": inv_rows[-1]["backdoor"], "image_mse": inv_rows[-1]["norm"],
                   "inverted_success": success}
            if stop:
                row["stopped"] = "a later target detection disagreed (earlystop)"
                rows.append(row)
                break
            if params.ul_round:
                ul = unlearn_with_generator(model, gen_net, x, y, device, params, opt_m, gen,
                                            tick=part(stage, label, a + b, 1.0 - a - b))
                row["unlearn_loss"] = ul[-1]
            row.update(monitor())
            rows.append(row)
            clock.tick(stage, 1.0, f"{label} done", {k: v for k, v in row.items() if k != "round"
                                                    and isinstance(v, float) and math.isfinite(v)})
        model.eval()
        trig = ctx.trigger
        true_target = (int(trig.target) if trig is not None and getattr(trig, "mapping", "") == "all-to-one"
                       and getattr(trig, "target", None) is not None else None)
        last = rows[-1] if rows else {}
        artifacts = {
            "detected_target": target, "target_shares": [round(s, 4) for s in shares],
            "attack_target": true_target,
            "target_correct": None if true_target is None or target is None else bool(true_target == target),
            "target_note": "the attack's target from the suspect's known trigger, which the defense never uses",
            "inverted_success": first_success, "rounds_run": len(rows),
            "image_mse": last.get("image_mse"), "mask_benign_share": last.get("mask_benign_share"),
            "images_used": n, "held_out_ba": last.get("held_out_ba"), "held_out_asr": last.get("held_out_asr"),
        }
        return DefenseOutput(model, artifacts, {"pretrain": [{"epoch": i + 1, "loss": v} for i, v in enumerate(pre)],
                                                "rounds": rows})
