"""Grad-CAM views of clean vs. triggered inputs (Selvaraju et al., ICCV 2017), via the ``grad-cam`` package.

The number that matters for backdoors is the *trigger-attention share*: the fraction of a map's mass that
falls on the trigger's footprint (the pixels the trigger changes). A backdoored model looks at its trigger
(Xu et al., arXiv 2002.12162, Fig. 1), a clean model does not.

For triggers that change most of the image (Blended, WaNet, SIG) the share is ~100% whatever the model looks
at, so it means nothing. For them (:attr:`GradCamComparison.whole_image`) two other measures apply: the
*map shift* (total-variation distance between the normalised maps of each clean image and its triggered copy:
0 = the model looks at the same place, 1 = somewhere else entirely) and the *share on the trigger's strongest
pixels* (the fraction of the image where the trigger changes the pixels most; chance = that fraction).

A sample-specific trigger (``Trigger.sample_specific``: the input-aware attack, Nguyen & Tran NeurIPS 2020, puts
a generated mask somewhere else on every image) is measured per image: each map's share is taken on *its own
image's* trigger pixels (``Trigger.footprints``), and chance is the mean of the per-image footprint shares; the
union over the sample would count pixels that another image's trigger covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from suspects.adapters import tokens_to_grid
from suspects.models import list_residual_blocks
from suspects.triggers import Trigger

from .samples import PairedSample

__all__ = [
    "CAM_METHODS",
    "TARGET_KINDS",
    "candidate_layers",
    "default_target_layer",
    "compute_cams",
    "attention_share",
    "map_shift",
    "strongest_pixels",
    "WHOLE_IMAGE_FRACTION",
    "GradCamComparison",
    "compare_gradcam",
    "cam_overlay",
]

CAM_METHODS = {
    "GradCAM": GradCAM,
    "GradCAM++": GradCAMPlusPlus,
    "XGradCAM": XGradCAM,
    "LayerCAM": LayerCAM,
    "EigenCAM": EigenCAM,
    "ScoreCAM": ScoreCAM,
}
TARGET_KINDS = ("predicted", "true", "target")
WHOLE_IMAGE_FRACTION = 0.5  # a footprint above this share of the image makes the trigger-attention share moot
STRONGEST_FRACTION = 0.1  # the share of pixels the "strongest pixels" measure keeps


def _token_layers(model: nn.Module) -> list[str]:
    """For a transformer: each block's first norm, whose (N, T, D) tokens a CAM reads on their patch grid."""
    names = []
    for block in getattr(model, "transformer_blocks", lambda: [])():
        mod = model.get_submodule(block)
        norm = next((n for n, c in mod.named_children() if isinstance(c, nn.LayerNorm)), None)
        if norm is not None:
            names.append(f"{block}.{norm}")
    return names


def _reshape_for(model: nn.Module, layer: str):
    """pytorch-grad-cam's ``reshape_transform`` for ``layer``: tokens onto their grid for a transformer's layers."""
    return tokens_to_grid if layer in _token_layers(model) else None


def candidate_layers(model: nn.Module) -> list[str]:
    """Layers a CAM can hook: a transformer's block norms, else residual blocks, else the ReLUs that follow
    convolutions (any activation module, for library networks)."""
    tokens = _token_layers(model)
    if tokens:
        return tokens
    blocks = list_residual_blocks(model)
    if blocks:
        return blocks
    names, prev_conv = [], False
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            prev_conv = True
        elif isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU)) and prev_conv:
            names.append(name)
            prev_conv = False
    return names


def _output_sizes(model: nn.Module, names: list[str], input_shape: tuple[int, int, int]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    modules = dict(model.named_modules())
    def size(o: torch.Tensor) -> int:  # a token sequence's size is its patch grid's side
        return int(math.isqrt(o.shape[1])) if o.dim() == 3 else int(o.shape[-1])

    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, size(o))) for n in names]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def default_target_layer(model: nn.Module, input_shape: tuple[int, int, int], min_size: int = 7) -> str:
    """The deepest candidate layer whose map is at least ``min_size`` pixels wide.

    A 4x4 map (``layer4`` on 28-32 px inputs) cannot localise a 3x3 trigger; ``layer3`` (7-8 px) can.
    """
    tokens = _token_layers(model)
    if tokens:  # a ViT: the last block's norm, as pytorch-grad-cam documents (every block sees the whole grid)
        return tokens[-1]
    names = candidate_layers(model)
    if not names:
        raise ValueError("model has no convolutional layer to attach a CAM to")
    sizes = _output_sizes(model, names, input_shape)
    fit = [n for n in names if sizes.get(n, 0) >= min_size]
    return fit[-1] if fit else names[0]


def compute_cams(model: nn.Module, images: torch.Tensor, layer: str, method: str = "GradCAM",
                 targets: list[int] | torch.Tensor | None = None, batch_size: int = 64) -> np.ndarray:
    """(B, H, W) maps in [0, 1] for ``images`` (raw [0, 1]); ``targets`` are class indices (None = predicted)."""
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"no layer {layer!r}; candidates: {', '.join(candidate_layers(model))}")
    device = next(model.parameters()).device
    was_training = model.training
    out = []
    try:
        with CAM_METHODS[method](model=model, target_layers=[modules[layer]],
                                 reshape_transform=_reshape_for(model, layer)) as cam:
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].to(device)
                t = None
                if targets is not None:
                    t = [ClassifierOutputTarget(int(c)) for c in targets[start:start + batch_size]]
                out.append(cam(input_tensor=x, targets=t))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return np.concatenate(out).astype(np.float32)


def attention_share(cams: np.ndarray, footprint: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per map: sum(map * footprint) / sum(map). NaN-free (an all-zero map counts as 0). ``footprint`` is one
    (H, W) map shared by all maps, or (B, H, W): each map's own (a sample-specific trigger's per-image pixels)."""
    fp = np.asarray(footprint, dtype=np.float32)
    if fp.ndim == 3:
        if len(fp) != len(cams):
            raise ValueError(f"{len(fp)} per-image footprints for {len(cams)} maps")
        if fp.shape[1:] != cams.shape[1:]:
            fp = F.interpolate(torch.from_numpy(fp)[:, None], size=cams.shape[1:], mode="nearest")[:, 0].numpy()
    elif fp.shape != cams.shape[1:]:
        fp = F.interpolate(torch.from_numpy(fp)[None, None], size=cams.shape[1:], mode="nearest")[0, 0].numpy()
    mass = cams.reshape(len(cams), -1).sum(1)
    on = (cams * (fp if fp.ndim == 3 else fp[None])).reshape(len(cams), -1).sum(1)
    return np.where(mass > 0, on / np.maximum(mass, 1e-12), 0.0)


def map_shift(clean_cams: np.ndarray, triggered_cams: np.ndarray) -> np.ndarray:
    """Per image: total-variation distance 0.5 * sum|p - q| between its clean and triggered maps, each normalised
    to sum 1 (an all-zero map counts as uniform). 0: the same attention; 1: disjoint."""
    def norm(c: np.ndarray) -> np.ndarray:
        flat = c.reshape(len(c), -1).astype(np.float64)
        mass = flat.sum(1, keepdims=True)
        return np.where(mass > 0, flat / np.maximum(mass, 1e-12), 1.0 / flat.shape[1])

    return 0.5 * np.abs(norm(clean_cams) - norm(triggered_cams)).sum(1)


def strongest_pixels(trigger: Trigger, x: torch.Tensor, fraction: float = STRONGEST_FRACTION,
                     per_image: bool = False) -> np.ndarray:
    """(H, W) bool: the ``fraction`` of pixels where the trigger changes ``x`` most (mean |trigger(x) - x| over
    images and channels); ``per_image``: (B, H, W), each image's own strongest pixels (a sample-specific trigger)."""
    if per_image:
        with torch.no_grad():
            strengths = (trigger(x) - x).abs().mean(dim=1).cpu().numpy()
        return np.stack([_top_fraction(s, fraction) for s in strengths])
    with torch.no_grad():
        strength = (trigger(x) - x).abs().mean(dim=(0, 1)).cpu().numpy()
    return _top_fraction(strength, fraction)


def _top_fraction(strength: np.ndarray, fraction: float) -> np.ndarray:
    """(H, W) bool: the ``fraction`` of pixels with the largest ``strength`` (ties: the first in raster order)."""
    k = max(1, int(round(fraction * strength.size)))
    cut = np.partition(strength.ravel(), -k)[-k]
    top = strength >= cut
    if top.sum() > k:  # ties: keep the first k in raster order
        flat = np.zeros(strength.size, dtype=bool)
        flat[np.flatnonzero(top.ravel())[:k]] = True
        top = flat.reshape(strength.shape)
    return top


@dataclass
class GradCamComparison:
    """Clean vs. triggered maps of the same images, with predictions and trigger-attention shares."""

    layer: str
    method: str
    target_kind: str
    clean_cams: np.ndarray
    triggered_cams: np.ndarray
    clean_pred: np.ndarray
    triggered_pred: np.ndarray
    clean_share: np.ndarray
    triggered_share: np.ndarray
    footprint: np.ndarray  # (H, W) bool: the pixels the trigger changes (sample-specific: on any image of the sample)
    footprint_fraction: float  # chance level: the footprint's share of the image (sample-specific: mean per image)
    shift: np.ndarray | None = None  # per image: map_shift(clean, triggered)
    strongest: np.ndarray | None = None  # (H, W) bool: the trigger's strongest pixels ((B, H, W): per image)
    clean_strong_share: np.ndarray | None = None
    triggered_strong_share: np.ndarray | None = None
    footprints: np.ndarray | None = None  # (B, H, W) bool: each image's own trigger pixels (sample-specific triggers)

    @property
    def sample_specific(self) -> bool:
        """The shares were measured on each image's own trigger pixels (:attr:`footprints`)."""
        return self.footprints is not None

    @property
    def whole_image(self) -> bool:
        """The trigger changes most of the image: the trigger-attention share does not apply."""
        return self.footprint_fraction > WHOLE_IMAGE_FRACTION

    @property
    def mean_shift(self) -> float:
        return float(np.mean(self.shift)) if self.shift is not None else float("nan")

    @property
    def strongest_fraction(self) -> float:
        return float(np.mean(self.strongest)) if self.strongest is not None else float("nan")

    @property
    def mean_triggered_strong_share(self) -> float:
        return float(np.mean(self.triggered_strong_share)) if self.triggered_strong_share is not None else float("nan")

    @property
    def mean_clean_strong_share(self) -> float:
        return float(np.mean(self.clean_strong_share)) if self.clean_strong_share is not None else float("nan")

    @property
    def mean_triggered_share(self) -> float:
        return float(self.triggered_share.mean())

    @property
    def mean_clean_share(self) -> float:
        return float(self.clean_share.mean())


def _targets(kind: str, pred: torch.Tensor, sample: PairedSample, trigger: Trigger) -> torch.Tensor:
    if kind == "predicted":
        return pred
    if kind == "true":
        return sample.labels
    if kind == "target":
        return trigger.target_labels(sample.labels)
    raise ValueError(f"target kind must be one of {TARGET_KINDS}, got {kind!r}")


def compare_gradcam(model: nn.Module, sample: PairedSample, trigger: Trigger, layer: str | None = None,
                    method: str = "GradCAM", target_kind: str = "predicted") -> GradCamComparison:
    """Grad-CAM of clean and triggered copies of ``sample`` for the predicted / true / attack-target class."""
    if sample.triggered is None:
        raise ValueError("the sample has no triggered copies (no trigger known)")
    from suspects.metrics import predict

    layer = layer or default_target_layer(model, tuple(sample.clean.shape[1:]))
    clean_pred = predict(model, sample.clean)
    trig_pred = predict(model, sample.triggered)
    clean_cams = compute_cams(model, sample.clean, layer, method, _targets(target_kind, clean_pred, sample, trigger))
    trig_cams = compute_cams(model, sample.triggered, layer, method, _targets(target_kind, trig_pred, sample, trigger))
    fps = None
    if trigger.sample_specific:  # each image's share on its own trigger, chance = the mean per-image footprint
        fps = trigger.footprints(sample.clean).cpu().numpy().astype(bool)
        fp, on, fraction = fps.any(0), fps, float(fps.mean())
        strong = strongest_pixels(trigger, sample.clean, per_image=True)
    else:
        fp = trigger.footprint(sample.clean[: min(16, len(sample))]).numpy()
        on, fraction = fp, float(fp.mean())
        strong = strongest_pixels(trigger, sample.clean[: min(64, len(sample))])
    return GradCamComparison(
        layer, method, target_kind, clean_cams, trig_cams, clean_pred.numpy(), trig_pred.numpy(),
        attention_share(clean_cams, on), attention_share(trig_cams, on), fp, fraction,
        map_shift(clean_cams, trig_cams), strong, attention_share(clean_cams, strong),
        attention_share(trig_cams, strong), fps,
    )


def cam_overlay(image: torch.Tensor, cam: np.ndarray, scale: int = 1) -> np.ndarray:
    """A map over its [0, 1] (C, H, W) image (jet colour map at half weight): uint8 (H*scale, W*scale, 3)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    img = image.detach().cpu().numpy().transpose(1, 2, 0).astype(np.float32)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    out = show_cam_on_image(np.clip(img, 0, 1), cam.astype(np.float32), use_rgb=True)
    return out.repeat(scale, 0).repeat(scale, 1) if scale > 1 else out
