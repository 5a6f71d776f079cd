"""DBD stage 1: a self-supervised backbone (SimCLR, labels ignored) and the backbone file kept with the run.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020; as used by
Huang et al., ICLR 2022 (see :mod:`defenses.dbd`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import full_precision, to_device
from suspects.models import penultimate_features
from suspects.training import FitStep, fit

from ..common import head

__all__ = ["ProjectionHead", "simclr_augment", "nt_xent", "simclr_train", "BACKBONE_FILE", "save_backbone",
           "load_backbone"]

BACKBONE_FILE = "dbd_backbone"


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
    """SimCLR's NT-Xent loss over the 2B views (positives: the two views of one image); z are L2-normalised.

    Computed in float32 (autocast off), also inside a mixed-precision training step."""
    with full_precision(z1.device):
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
                 monitor: Callable[[], dict] | None = None, max_steps: int | None = None) -> list[dict]:
    """Stage 1: SimCLR on ``x`` (labels unused). Returns one row per epoch (mean loss, live k-NN metrics)."""
    params = _backbone_params(model) + list(proj.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, schedule_epochs or epochs))
    bs = min(batch_size, len(x))
    steps = max(1, len(x) // bs)
    rows: list[dict] = []

    def batches(epoch: int):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            v1 = to_device(simclr_augment(x[idx], gen), device)
            v2 = to_device(simclr_augment(x[idx], gen), device)
            yield v1, v2

    def loss_fn(views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        v1, v2 = views
        z = proj(penultimate_features(model, torch.cat([v1, v2])))
        return nt_xent(z[:len(v1)], z[len(v1):], tau)

    def on_step(s: FitStep) -> None:
        if tick is not None:
            tick((s.epoch + (s.batch + 1) / steps) / epochs, f"stage 1/3 SimCLR: epoch {s.epoch + 1}/{epochs}",
                 {"simclr_loss": s.loss} if s.batch == 0 and s.epoch == 0 else None)

    def end_epoch(epoch: int, loss: float) -> None:
        sched.step()
        row = {"epoch": epoch + 1, "loss": loss}
        if monitor is not None:
            row.update(monitor())
        rows.append(row)
        if tick is not None:
            tick((epoch + 1) / epochs, f"stage 1/3 SimCLR: epoch {epoch + 1}/{epochs}",
                 {"simclr_loss": row["loss"], **{k: v for k, v in row.items() if k.startswith("knn")}})

    fit(nn.ModuleList([model, proj]), batches, loss_fn, opt, device=device, epochs=epochs, max_steps=max_steps,
        tick=on_step, end_epoch=end_epoch)
    return rows


def save_backbone(path: Path, model: nn.Module, proj: ProjectionHead, meta: dict) -> Path:
    """Write the backbone (every weight but the classifier's) and the projection head as one safetensors file."""
    from safetensors.torch import save_file

    lin = {f"linear.{k}" for k in head(model).state_dict()}
    tensors = {f"backbone.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
               if k not in lin}
    tensors.update({f"proj.{k}": v.detach().cpu().contiguous().clone() for k, v in proj.state_dict().items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in meta.items()})
    tmp.replace(path)
    return path


def load_backbone(ref: str | Path, model: nn.Module, proj: ProjectionHead, fingerprint: str) -> dict[str, str]:
    """Load a stored stage-1 backbone into ``model`` and ``proj``; returns the file's metadata.

    ``ref`` is the file or the folder of the run that holds it (a run id is resolved to it by whoever owns the
    run store, before the defense runs).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(str(ref).strip()).expanduser()
    if path.is_dir():
        path = path / f"{BACKBONE_FILE}.safetensors"
    if not str(ref).strip() or not path.is_file():
        raise ValueError(f"reuse_backbone_from: no {BACKBONE_FILE}.safetensors at {str(ref)!r}; give an earlier DBD "
                         "run's folder or the file (a run id is looked up by the run store that runs the job)")
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
