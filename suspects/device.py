"""Pick the compute device once (``cuda`` > ``mps`` > ``cpu``, overridable) and its speed settings."""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["pick_device", "autocast", "prepare_model", "describe_device"]


def pick_device(override: str | None = None) -> torch.device:
    """``override`` (or the environment variable ``BACKDOOR_LENS_DEVICE``) wins; else the best available."""
    choice = override or os.environ.get("BACKDOOR_LENS_DEVICE") or None
    if choice and choice != "auto":
        dev = torch.device(choice)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {choice!r} requested but CUDA is not available on this machine")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device {choice!r} requested but MPS is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device | str, enabled: bool = True):
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move to ``device``; channels-last memory format on CUDA and CPU (faster convolutions on both)."""
    device = torch.device(device)
    model = model.to(device)
    if device.type in ("cuda", "cpu"):
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    x = x.to(device, non_blocking=True)
    if device.type in ("cuda", "cpu") and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def describe_device(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
