"""DBD: Decoupling-based Backdoor Defense. Huang, Li, Wu, Qin & Ren, "Backdoor Defense via Decoupling the Training
Process", ICLR 2022 (arXiv 2202.03423; official code SCLBD/DBD).

Supervised training lets the trigger -> target shortcut form its own cluster in feature space. DBD retrains the
suspect's architecture from the poisoned training set in three stages:

1. **Self-supervised backbone.** SimCLR on the poisoned training images with the labels ignored: projection head
   g = Linear(d, d)-BN-ReLU-Linear(d, 128), NT-Xent loss at temperature tau, the SimCLR augmentations
   (random resized crop 0.2-1 bicubic, horizontal flip, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2,
   Gaussian blur sigma 0.1-2 with p 0.5). The trigger is already in the images, so it is applied before augmentation.
2. **Warm-up.** The backbone is frozen (features under ``no_grad``) and a fresh linear head is trained with the
   symmetric cross-entropy SCE = alpha * CE + beta * RCE on all (poisoned) labels, which is robust to the
   "noisy" poisoned labels, so poisoned samples keep a high loss.
3. **Semi-supervised fine-tuning.** Every epoch the SCE loss of every training sample is recomputed (eval mode,
   training augmentation); the lowest ``epsilon`` share keeps its labels, the rest loses them, and the whole model
   is trained with MixMatch (2 augmentations per unlabelled image, sharpening T, MixUp Beta(0.75, 0.75),
   L = Lx + lambda_u(t) * Lu with lambda_u ramped linearly over ``rampup`` epochs counted from the start of
   stage 2). Adam (lr 0.002, no weight decay) continues from stage 2. The last model is returned (the official
   ``best_model.pt`` is picked on test accuracy; we never look at the test split).

The stage-1 backbone (and projection head) is kept with the run as ``dbd_backbone.safetensors``; pass its run id
or folder as ``reuse_backbone_from`` to re-run only stages 2 and 3 (the file records the suspect it was trained
for and is refused for another one). Each stage-3 epoch records how well the split separates poisoned from clean
samples: precision and recall of the samples that lose their labels against the known poisoned indices.

Deliberate deviations from the paper / official code:
- ``quick`` preset: far fewer epochs and MixMatch iterations (stage 1: 5 epochs of batch 256 instead of 100 of
  512; stage 2: 2 epochs instead of 10; stage 3: 5 epochs of 150 iterations instead of 190 x 1024), a cosine
  schedule annealed over the short stage 1 and a lambda_u ramp over the short run, so the whole pipeline fits
  ~10 CPU minutes on the demo suspects. With so little training the model stays well below the suspect's BA
  (the width-8 demo model itself needs ~6 supervised epochs to reach 0.80).
- ``split="per-class"`` (``quick`` preset): the lowest-loss epsilon share *within each training label* keeps its
  labels. With the short stage 1 the paper's global split left whole classes (Pullover and Shirt on the
  Fashion-MNIST demo) without a single labelled sample, so the model never learned them (BA 0.66 on BadNets).
  This was decided from training-set information (the labelled-per-class counts the run reports, and a warning
  when a class is starved); the price is that the target class, which holds all relabelled poisoned samples,
  keeps its lowest-loss half labelled, so a few more poisoned samples keep their labels.
- NT-Xent is SimCLR's symmetric form (both views are anchors); the official SCAN variant anchors view 1 only.
- Augmentations are batched tensor ops: colour-jitter factors are applied in a fixed order, hue is a YIQ
  rotation, saturation / hue / grayscale only act on 3-channel images, weak augmentation is a random crop with
  zero padding of H/8 pixels (official: 4-pixel reflect padding on 32x32) plus a horizontal flip.
- MixMatch runs one forward pass over the 3B mixed images (BatchNorm sees the mixed batch, which is what the
  official interleave trick emulates with three passes).
- Stage 2 freezes the backbone as the official code does (no gradients; BatchNorm statistics still adapt to the
  weak augmentation). The held-out part of the defense pool is left out of the training set so the live BA / ASR
  on it stays held out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import autocast, to_device
from suspects.models import penultimate_features
from suspects.training import augment_batch

from .base import ArtifactFile, Defense, DefenseOutput, ParamError, ThreatModel, param
from .common import head, pool_monitor
from .registry import register_defense
from .retrain import (
    StageClock,
    TrainingSet,
    histogram,
    knn_monitor,
    poisoned_training_set,
    reinitialize,
    split_quality,
    suspect_fingerprint,
)

__all__ = ["DBD", "DBDParams", "simclr_augment", "nt_xent", "sce_loss", "ProjectionHead", "simclr_train",
           "warmup_train", "sce_split", "mixmatch_epoch", "lambda_u_at", "BACKBONE_FILE"]

BACKBONE_FILE = "dbd_backbone"


@dataclass
class DBDParams:
    simclr_epochs: int = param(100, help="stage 1: SimCLR epochs (the official fine-tune loads epoch 100)",
                               min=0, max=5000)
    simclr_batch_size: int = param(512, help="stage 1: images per SimCLR step (two views each)", min=2, max=8192)
    simclr_lr: float = param(0.4, help="stage 1: SGD learning rate (momentum 0.9, weight decay 1e-4)",
                             min=1e-6, max=10.0)
    simclr_schedule: int = param(1000, help="stage 1: length of the cosine schedule in epochs (official 1000 "
                                            "although epoch 100 is used; 0 = simclr_epochs)", min=0, max=100000)
    tau: float = param(0.5, help="stage 1: temperature of the NT-Xent loss", min=0.01, max=10.0)
    proj_dim: int = param(128, help="stage 1: output size of the projection head", min=2, max=4096)
    warmup_epochs: int = param(10, help="stage 2: epochs of the linear head on the frozen backbone", min=0, max=1000)
    warmup_batch_size: int = param(128, help="stage 2: images per step", min=1, max=8192)
    alpha: float = param(0.1, help="SCE weight of the cross-entropy term", min=0.0, max=100.0)
    beta: float = param(1.0, help="SCE weight of the reverse cross-entropy term", min=0.0, max=100.0)
    semi_epochs: int = param(190, help="stage 3: MixMatch epochs (the split is redone every epoch)", min=0, max=5000)
    iterations: int = param(1024, help="stage 3: MixMatch iterations per epoch", min=1, max=100000)
    batch_size: int = param(64, help="stage 3: labelled images per step (and as many unlabelled)", min=2, max=4096)
    epsilon: float = param(0.5, help="share of training samples (lowest SCE loss) that keep their labels",
                           min=0.01, max=1.0)
    T: float = param(0.5, help="stage 3: sharpening temperature of the guessed labels", min=0.01, max=10.0)
    mix_alpha: float = param(0.75, help="stage 3: MixUp coefficient lambda ~ Beta(mix_alpha, mix_alpha)",
                             min=0.01, max=10.0)
    lambda_u: float = param(15.0, help="stage 3: weight of the unlabelled loss after the ramp-up", min=0.0, max=1000.0)
    rampup: int = param(190, help="epochs from the start of stage 2 over which lambda_u ramps up linearly "
                                  "(0 = no ramp)", min=0, max=100000)
    lr: float = param(0.002, help="Adam learning rate of stages 2 and 3 (no weight decay, no schedule)",
                      min=1e-7, max=1.0)
    split: str = param("global", help="global: the lowest-loss epsilon share of all samples keeps its labels (paper); "
                                      "per-class: the lowest-loss epsilon share of each (possibly poisoned) label",
                       choices=("global", "per-class"))
    augment: str = param("crop-flip", help="weak augmentation of stages 2 and 3", choices=("crop", "crop-flip"))
    subset: int = param(0, help="use a random subset of this many poisoned training images (0 = all)",
                        min=0, max=10**8)
    reuse_backbone_from: str = param("", help="run id or folder of an earlier DBD run on this suspect (or its "
                                              "dbd_backbone.safetensors): reuse its stage-1 backbone and run only "
                                              "stages 2 and 3; empty = train stage 1")

    def check(self) -> None:
        if self.semi_epochs > 0 and self.epsilon >= 1.0:
            raise ParamError("parameter 'epsilon' must be below 1 when stage 3 runs (someone must lose a label)")


# --- stage 1: SimCLR --------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """SimCLR's g: Linear(d, d) - BN - ReLU - Linear(d, proj_dim); outputs are L2-normalised."""

    def __init__(self, d: int, proj_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h).float(), dim=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x.mean(1, keepdim=True)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _hue_rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma of RGB images in YIQ space by ``2 pi shift`` (shift in turns, per sample)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    to_rgb = torch.linalg.inv(to_yiq)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    a = 2 * math.pi * shift.view(-1, 1, 1)
    cos, sin = a.cos(), a.sin()
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", to_rgb, yiq)


def _blur_matrices(sigma: torch.Tensor, size: int, radius: int) -> torch.Tensor:
    """(B, size, size) matrices applying a 1-D Gaussian of per-sample ``sigma`` with reflect padding."""
    t = torch.arange(-radius, radius + 1)
    k = torch.exp(-0.5 * (t[None, :].float() / sigma[:, None].clamp_min(1e-3)) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, K)
    j = torch.arange(size)[:, None] + t[None, :]  # (size, K) source pixel of each tap, reflected at the borders
    j = torch.where(j < 0, -j, j)
    j = torch.where(j > size - 1, 2 * (size - 1) - j, j)
    m = torch.zeros(len(sigma), size, size)
    return m.scatter_add_(2, j[None].expand(len(sigma), -1, -1), k[:, None, :].expand(-1, size, -1))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (reflect padding), as two batched matrix products."""
    _, _, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * max_sigma)), (min(h, w) - 1) // 2))
    rows, cols = _blur_matrices(sigma, h, radius), _blur_matrices(sigma, w, radius)
    return torch.einsum("bij,bcjk,blk->bcil", rows, x, cols)


def simclr_augment(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.2, 1.0),
                   jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1), p_jitter: float = 0.8,
                   p_gray: float = 0.2, p_blur: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """SimCLR's augmentations on a batch of [0, 1] images (CPU tensors), each sample drawn independently."""
    b, c, h, w = x.shape
    # random resized crop (area share in ``scale``, aspect ratio 3/4 - 4/3) and horizontal flip, as one affine map
    area = _uniform(b, *scale, gen)
    ratio = torch.exp(_uniform(b, math.log(3 / 4), math.log(4 / 3), gen))
    cw, ch = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    cx, cy = (2 * torch.rand(b, generator=gen) - 1) * (1 - cw), (2 * torch.rand(b, generator=gen) - 1) * (1 - ch)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw * flip, cx, ch, cy
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)
    # colour jitter with probability p_jitter: brightness, contrast, saturation, hue (fixed order)
    jit = (torch.rand(b, generator=gen) < p_jitter).view(-1, 1, 1, 1)
    bri, con, sat, hue = jitter
    fb = _uniform(b, max(0.0, 1 - bri), 1 + bri, gen).view(-1, 1, 1, 1)
    fc = _uniform(b, max(0.0, 1 - con), 1 + con, gen).view(-1, 1, 1, 1)
    j = (out * fb).clamp(0, 1)
    m = _gray(j).mean(dim=(1, 2, 3), keepdim=True)
    j = ((j - m) * fc + m).clamp(0, 1)
    if c == 3:
        fs = _uniform(b, max(0.0, 1 - sat), 1 + sat, gen).view(-1, 1, 1, 1)
        g = _gray(j)
        j = ((j - g) * fs + g).clamp(0, 1)
        j = _hue_rotate(j, _uniform(b, -hue, hue, gen)).clamp(0, 1)
    out = torch.where(jit, j, out)
    if c == 3:
        gray = (torch.rand(b, generator=gen) < p_gray).view(-1, 1, 1, 1)
        out = torch.where(gray, _gray(out).expand_as(out), out)
    blur = torch.rand(b, generator=gen) < p_blur
    if blur.any():
        s = _uniform(b, *sigma, gen)
        out = torch.where(blur.view(-1, 1, 1, 1), _gaussian_blur(out, s, sigma[1]), out)
    return out.clamp(0, 1).contiguous()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss over the 2B views (positives: the two views of one image); z are L2-normalised."""
    z = torch.cat([z1, z2]).float()
    n = len(z1)
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _backbone_params(model: nn.Module) -> list[nn.Parameter]:
    lin = head(model)
    skip = {id(p) for p in lin.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]


def simclr_train(model: nn.Module, proj: ProjectionHead, x: torch.Tensor, device, epochs: int, batch_size: int,
                 lr: float, tau: float, schedule_epochs: int, gen: torch.Generator, tick=None,
                 monitor=None, max_steps: int | None = None) -> list[dict]:
    """Stage 1: SimCLR on ``x`` (labels unused). Returns one row per epoch (mean loss, live k-NN metrics)."""
    params = _backbone_params(model) + list(proj.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, schedule_epochs or epochs))
    bs = min(batch_size, len(x))
    steps = max(1, len(x) // bs)
    rows, done = [], 0
    for epoch in range(epochs):
        model.train()
        proj.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            v1 = to_device(simclr_augment(x[idx], gen), device)
            v2 = to_device(simclr_augment(x[idx], gen), device)
            with autocast(device):
                h = penultimate_features(model, torch.cat([v1, v2]))
                z = proj(h)
            loss = nt_xent(z[:len(idx)], z[len(idx):], tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            done += 1
            if tick is not None:
                tick((epoch + (s + 1) / steps) / epochs, f"stage 1/3 SimCLR: epoch {epoch + 1}/{epochs}",
                     {"simclr_loss": float(loss.detach())} if s == 0 and epoch == 0 else None)
            if max_steps is not None and done >= max_steps:
                break
        sched.step()
        row = {"epoch": epoch + 1, "loss": total / max(1, min(steps, s + 1))}
        if monitor is not None:
            row.update(monitor())
        rows.append(row)
        if tick is not None:
            tick((epoch + 1) / epochs, f"stage 1/3 SimCLR: epoch {epoch + 1}/{epochs}",
                 {"simclr_loss": row["loss"], **{k: v for k, v in row.items() if k.startswith("knn")}})
        if max_steps is not None and done >= max_steps:
            break
    return rows


# --- stage 2: warm-up of the linear head -------------------------------------------------------------------


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
    rows, done = [], 0
    steps = max(1, math.ceil(len(data) / batch_size))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(data), generator=gen)
        total, seen = 0.0, 0
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            xb = to_device(augment_batch(data.x[idx], augment, gen), device)
            yb = data.y[idx].to(device)
            with torch.no_grad(), autocast(device):
                feats = penultimate_features(model, xb)
            with autocast(device):
                logits = lin(feats.detach())
            loss = sce_loss(logits, yb, alpha, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            done += 1
            if tick is not None:
                tick((epoch + (s + 1) / steps) / max(epochs, 1), f"stage 2/3 warm-up: epoch {epoch + 1}/{epochs}")
            if max_steps is not None and done >= max_steps:
                break
        row = {"epoch": epoch + 1, "sce_loss": total / max(seen, 1)}
        if monitor is not None:
            row.update(monitor())
        rows.append(row)
        if tick is not None:
            tick((epoch + 1) / epochs, f"stage 2/3 warm-up: epoch {epoch + 1}/{epochs}", row)
        if max_steps is not None and done >= max_steps:
            break
    return rows


# --- stage 3: split + MixMatch -------------------------------------------------------------------------------


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


def lambda_u_at(t: float, lambda_u: float, rampup: int) -> float:
    """lambda_u(t) = lambda_u * clip(t / rampup, 0, 1), t in epochs from the start of stage 2."""
    if rampup <= 0:
        return float(lambda_u)
    return float(lambda_u) * min(max(t / rampup, 0.0), 1.0)


class _Cycler:
    """Endless random batches without replacement from ``index`` (reshuffled after each pass)."""

    def __init__(self, index: torch.Tensor, batch_size: int, gen: torch.Generator):
        self.index, self.bs, self.gen = index, min(batch_size, len(index)), gen
        self.perm, self.pos = index[torch.randperm(len(index), generator=gen)], 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > len(self.perm):
            self.perm, self.pos = self.index[torch.randperm(len(self.index), generator=self.gen)], 0
        out = self.perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return out


def mixmatch_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: TrainingSet, labelled: torch.Tensor,
                   device, iterations: int, batch_size: int, T: float, mix_alpha: float, lambda_u: float,
                   rampup: int, t0: float, augment: str, gen: torch.Generator, tick=None,
                   label: str = "") -> dict:
    """One MixMatch epoch on the whole model: ``labelled`` keep their labels, the others are unlabelled."""
    num_classes = head(model).out_features
    xi = torch.nonzero(labelled).flatten()
    ui = torch.nonzero(~labelled).flatten()
    xs = _Cycler(xi, batch_size, gen)
    us = _Cycler(ui, batch_size, gen) if len(ui) >= 2 else None
    beta = torch.distributions.Beta(torch.tensor(float(mix_alpha)), torch.tensor(float(mix_alpha)))
    model.train()
    sum_x = sum_u = 0.0
    lam_u = 0.0
    for it in range(iterations):
        bx = xs.next()
        x1 = augment_batch(data.x[bx], augment, gen)
        tx = F.one_hot(data.y[bx], num_classes).float()
        inputs, targets = [x1], [tx]
        if us is not None:
            bu = us.next()
            u1 = augment_batch(data.x[bu], augment, gen)
            u2 = augment_batch(data.x[bu], augment, gen)
            with torch.no_grad(), autocast(device):
                p = (F.softmax(model(to_device(u1, device)).float(), 1) + F.softmax(model(to_device(u2, device)).float(), 1)) / 2
            p = p.cpu() ** (1.0 / T)
            q = p / p.sum(1, keepdim=True)
            inputs += [u1, u2]
            targets += [q, q]
        all_x, all_t = torch.cat(inputs), torch.cat(targets)
        lam = float(beta.sample())
        lam = max(lam, 1.0 - lam)
        perm = torch.randperm(len(all_x), generator=gen)
        mixed_x = to_device(lam * all_x + (1 - lam) * all_x[perm], device)
        mixed_t = (lam * all_t + (1 - lam) * all_t[perm]).to(device)
        with autocast(device):
            logits = model(mixed_x).float()
        nx = len(bx)
        loss_x = -(F.log_softmax(logits[:nx], 1) * mixed_t[:nx]).sum(1).mean()
        if us is not None:
            loss_u = ((F.softmax(logits[nx:], 1) - mixed_t[nx:]) ** 2).mean()
        else:
            loss_u = torch.zeros((), device=logits.device)
        lam_u = lambda_u_at(t0 + it / iterations, lambda_u, rampup)
        loss = loss_x + lam_u * loss_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sum_x += float(loss_x.detach())
        sum_u += float(loss_u.detach())
        if tick is not None:
            tick((it + 1) / iterations, label)
    return {"loss_x": sum_x / iterations, "loss_u": sum_u / iterations, "lambda_u": lam_u}


# --- the defense -------------------------------------------------------------------------------------------


def _loss_edges(loss: torch.Tensor, bins: int = 30) -> torch.Tensor:
    hi = float(loss.max()) if len(loss) else 1.0
    return torch.linspace(0.0, max(hi, 1e-3), bins + 1)


def _backbone_file(model: nn.Module, proj: ProjectionHead, meta: dict) -> ArtifactFile:
    lin = {f"linear.{k}" for k in head(model).state_dict()}
    tensors = {f"backbone.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in lin}
    tensors.update({f"proj.{k}": v.detach().cpu().clone() for k, v in proj.state_dict().items()})
    return ArtifactFile(tensors, {k: str(v) for k, v in meta.items()})


def load_backbone(ref: str, model: nn.Module, proj: ProjectionHead, fingerprint: str) -> dict[str, str]:
    """Load a stored stage-1 backbone into ``model`` and ``proj``; returns the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    # TODO(issue 11): the repair context replaces this look-up in the run store (defenses must not import runs)
    from runs.store import run_file

    try:
        path = run_file(ref, f"{BACKBONE_FILE}.safetensors")
    except FileNotFoundError as err:
        raise ValueError(f"reuse_backbone_from: {err}") from err
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    if meta.get("kind") != "dbd-simclr-backbone":
        raise ValueError(f"{path} is not a DBD stage-1 backbone")
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"the backbone in {path} was trained on another suspect's poisoned training set "
                         f"(suspect {meta.get('suspect')!r}); run stage 1 for this suspect instead")
    tensors = load_file(str(path))
    bb = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    pr = {k[len("proj."):]: v for k, v in tensors.items() if k.startswith("proj.")}
    lin = {f"linear.{k}" for k in head(model).state_dict()}
    missing, unexpected = model.load_state_dict(bb, strict=False)
    missing = [k for k in missing if k not in lin]
    if missing or unexpected:
        raise ValueError(f"the backbone in {path} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    proj.load_state_dict(pr)
    meta["path"] = str(path)
    return meta


@register_defense
class DBD(Defense):
    name = "dbd"
    title = "Decoupling-based Backdoor Defense (DBD)"
    paper = "Huang et al., ICLR 2022 (arXiv 2202.03423)"
    summary = ("Retrains the model from the poisoned training set in three stages: a self-supervised backbone "
               "(SimCLR, labels ignored, so features group by content rather than by trigger), a linear head with "
               "a noise-robust loss, then semi-supervised MixMatch fine-tuning where the high-loss half (where the "
               "poisoned samples land) loses its labels.")
    threat = ThreatModel(clean_pool=False, poisoned_training_set=True,
                         note="retrains from scratch; the clean pool only feeds the live held-out BA / ASR")
    Params = DBDParams
    presets = {
        "quick": {"simclr_epochs": 5, "simclr_batch_size": 256, "simclr_schedule": 0, "warmup_epochs": 2,
                  "semi_epochs": 5, "iterations": 150, "rampup": 7, "split": "per-class"},
        "paper": {},
    }
    artifact_labels = {"split_precision": "share of label-dropped samples that are poisoned (last epoch)",
                       "split_recall": "share of poisoned samples whose label was dropped (last epoch)"}
    curve_labels = {"simclr": "stage 1: SimCLR loss and k-NN BA / ASR on the held-out pool",
                    "warmup": "stage 2: SCE loss of the linear head, held-out BA / ASR",
                    "split": "stage 3 split: precision / recall of the label-dropped samples vs. the known poison",
                    "semi": "stage 3: MixMatch losses, held-out BA / ASR"}

    def repair(self, suspect, model, params: DBDParams, pool, device, progress, should_stop):
        lin = head(model)
        data = poisoned_training_set(suspect, pool, params.subset, seed=0)
        if len(data) < 2:
            raise ValueError("DBD needs at least two training images")
        gen = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31)
        reinitialize(model)
        proj = ProjectionHead(lin.in_features, params.proj_dim).to(device)
        fingerprint = suspect_fingerprint(suspect)
        n = len(data)
        reuse = params.reuse_backbone_from.strip()
        simclr_cost = 0.0 if reuse else params.simclr_epochs * n * 2 * 3
        clock = StageClock(progress, should_stop, {
            "simclr": simclr_cost, "warmup": params.warmup_epochs * n,
            "semi": params.semi_epochs * (n + params.iterations * params.batch_size * 11)})
        warnings = []
        rate = data.poison_rate
        if params.semi_epochs and 1 - params.epsilon < rate:
            warnings.append(f"1 - epsilon = {1 - params.epsilon:.2f} is below the poisoning rate {rate:.2f}: "
                            "some poisoned samples must keep their labels")

        # stage 1
        t_stage = time.time()
        stage1: dict = {}
        simclr_rows: list[dict] = []
        if reuse:
            meta = load_backbone(reuse, model, proj, fingerprint)
            stage1 = {"reused_from": meta.get("path"), "simclr_epochs": meta.get("simclr_epochs"),
                      "trained_in_run": meta.get("run", "")}
            progress(clock.start["warmup"], f"stage 1/3: reused the backbone of {reuse}", {})
        else:
            simclr_rows = simclr_train(model, proj, data.x, device, params.simclr_epochs, params.simclr_batch_size,
                                       params.simclr_lr, params.tau, params.simclr_schedule, gen,
                                       tick=lambda f, m, d=None: clock.tick("simclr", f, m, d),
                                       monitor=knn_monitor(model, pool, suspect.trigger, device))
            stage1 = {"simclr_epochs": params.simclr_epochs, "seconds": round(time.time() - t_stage, 1)}
        backbone = _backbone_file(model, proj, {
            "kind": "dbd-simclr-backbone", "fingerprint": fingerprint, "suspect": suspect.name,
            "arch": suspect.card.get("arch", ""), "simclr_epochs": stage1.get("simclr_epochs"),
            "tau": params.tau, "proj_dim": params.proj_dim})
        del proj

        # stage 2
        opt = torch.optim.Adam(model.parameters(), lr=params.lr)
        monitor = pool_monitor(model, pool, suspect.trigger, device)
        warm_rows = warmup_train(model, opt, data, device, params.warmup_epochs, params.warmup_batch_size,
                                 params.alpha, params.beta, params.augment, gen,
                                 tick=lambda f, m, d=None: clock.tick("warmup", f, m, d), monitor=monitor)

        # stage 3
        split_rows, semi_rows, histos = [], [], []
        num_classes = lin.out_features
        per_class = torch.zeros(num_classes, dtype=torch.long)
        share = 1.0 / (params.iterations * params.batch_size * 11 / n + 1)  # split's share of an epoch's work
        for epoch in range(params.semi_epochs):
            label = f"stage 3/3 MixMatch: epoch {epoch + 1}/{params.semi_epochs}"
            clock.tick("semi", epoch / params.semi_epochs, f"stage 3/3 split: epoch {epoch + 1}/{params.semi_epochs}")
            loss, labelled = sce_split(model, data, device, params.epsilon, params.alpha, params.beta,
                                       params.augment, gen, per_class=params.split == "per-class")
            q = split_quality(~labelled, data.poisoned)
            per_class = torch.bincount(data.y[labelled], minlength=num_classes)
            starved = [c for c in range(num_classes) if per_class[c] == 0 and (data.y == c).any()]
            if starved and not any("no labelled sample" in w for w in warnings):
                warnings.append(f"the split left classes {starved} without any labelled sample (epoch {epoch + 1}); "
                                "the model cannot learn them: consider split=per-class or a longer stage 1")
            split_rows.append({"epoch": epoch + 1, "precision": q["precision"], "recall": q["recall"]})
            if epoch == 0 or epoch == params.semi_epochs - 1:
                edges = _loss_edges(loss)
                histos.append({"epoch": epoch + 1, "clean": histogram(loss[~data.poisoned], edges),
                               "poisoned": histogram(loss[data.poisoned], edges),
                               "cut": float(loss[labelled].max()) if labelled.any() else 0.0,
                               "edges": edges.tolist()})
            clock.tick("semi", (epoch + share) / params.semi_epochs, label,
                       {"split_precision": q["precision"], "split_recall": q["recall"],
                        "poisoned_kept": q["poisoned_kept"]})
            res = mixmatch_epoch(
                model, opt, data, labelled, device, params.iterations, params.batch_size, params.T,
                params.mix_alpha, params.lambda_u, params.rampup, params.warmup_epochs + epoch, params.augment, gen,
                tick=lambda f, m, e=epoch: clock.tick("semi", (e + share + (1 - share) * f) / params.semi_epochs, m),
                label=label)
            row = {"epoch": epoch + 1, **{k: res[k] for k in ("loss_x", "loss_u")}, **monitor()}
            semi_rows.append(row)
            clock.tick("semi", (epoch + 1) / params.semi_epochs, label, {**row, "lambda_u": res["lambda_u"]})
        model.eval()
        last = split_rows[-1] if split_rows else {}
        artifacts = {
            "n_train": n, "n_poisoned_train": int(data.poisoned.sum()), "poison_rate_train": round(rate, 4),
            "stage1": stage1, "backbone_file": f"{BACKBONE_FILE}.safetensors",
            "split": params.split,
            "split_precision": last.get("precision"), "split_recall": last.get("recall"),
            "labelled_per_class": per_class.tolist(),
            "split_note": "precision / recall of the samples that lose their labels, against the known poisoned "
                          "indices (the defense never uses them)",
            "held_out_ba": (semi_rows or warm_rows or [{}])[-1].get("held_out_ba"),
            "held_out_asr": (semi_rows or warm_rows or [{}])[-1].get("held_out_asr"),
            "loss_histograms": {"x_label": "SCE loss at the split", "cut_label": "epsilon cut",
                                "series": histos},
            "warnings": warnings,
        }
        curves = {"simclr": simclr_rows, "warmup": warm_rows, "split": split_rows, "semi": semi_rows}
        return DefenseOutput(model, artifacts, {k: v for k, v in curves.items() if v},
                             files={BACKBONE_FILE: backbone})

