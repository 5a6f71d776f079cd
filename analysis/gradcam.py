"""Grad-CAM views of clean vs. triggered inputs (Selvaraju et al., ICCV 2017), via the ``grad-cam`` package.

The number that matters for backdoors is the *trigger-attention share*: the fraction of a map's mass that
falls on the trigger's footprint (the pixels the trigger changes). A backdoored model looks at its trigger
(Xu et al., arXiv 2002.12162, Fig. 1), a clean model does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

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


def candidate_layers(model: nn.Module) -> list[str]:
    """Layers a CAM can hook: residual blocks, else the ReLUs that follow convolutions."""
    blocks = list_residual_blocks(model)
    if blocks:
        return blocks
    names, prev_conv = [], False
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            prev_conv = True
        elif isinstance(m, nn.ReLU) and prev_conv:
            names.append(name)
            prev_conv = False
    return names


def _output_sizes(model: nn.Module, names: list[str], input_shape: tuple[int, int, int]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[-1]))
             for n in names]
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
        with CAM_METHODS[method](model=model, target_layers=[modules[layer]]) as cam:
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
    """Per map: sum(map * footprint) / sum(map). NaN-free (an all-zero map counts as 0)."""
    fp = np.asarray(footprint, dtype=np.float32)
    if fp.shape != cams.shape[1:]:
        fp = F.interpolate(torch.from_numpy(fp)[None, None], size=cams.shape[1:], mode="nearest")[0, 0].numpy()
    mass = cams.reshape(len(cams), -1).sum(1)
    on = (cams * fp[None]).reshape(len(cams), -1).sum(1)
    return np.where(mass > 0, on / np.maximum(mass, 1e-12), 0.0)


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
    footprint: np.ndarray
    footprint_fraction: float

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
    fp = trigger.footprint(sample.clean[: min(16, len(sample))]).numpy()
    return GradCamComparison(
        layer, method, target_kind, clean_cams, trig_cams, clean_pred.numpy(), trig_pred.numpy(),
        attention_share(clean_cams, fp), attention_share(trig_cams, fp), fp, float(fp.mean()),
    )


def cam_overlay(image: torch.Tensor, cam: np.ndarray, scale: int = 1) -> np.ndarray:
    """A map over its [0, 1] (C, H, W) image (jet colour map at half weight): uint8 (H*scale, W*scale, 3)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    img = image.detach().cpu().numpy().transpose(1, 2, 0).astype(np.float32)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    out = show_cam_on_image(np.clip(img, 0, 1), cam.astype(np.float32), use_rgb=True)
    return out.repeat(scale, 0).repeat(scale, 1) if scale > 1 else out
