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


def _cpu_channels_last_unsafe(conv: torch.nn.Module) -> bool:
    """A strided 1x1 convolution with fewer than 16 input channels: its channels-last backward on the CPU
    (torch 2.14.1) corrupts memory for odd batch sizes (3, 5, 7, ...), e.g. the 8 -> 16 shortcut of a width-8
    PreAct-ResNet. Such convolutions run in the standard memory format instead."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and max(conv.stride) > 1
            and conv.in_channels < 16)


def _standard_format_input(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)


def prepare_model(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move to ``device``; channels-last memory format on CUDA and CPU (faster convolutions on both), except
    for the convolutions that the CPU's channels-last backward gets wrong (see ``_cpu_channels_last_unsafe``)."""
    device = torch.device(device)
    model = model.to(device)
    if device.type in ("cuda", "cpu"):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        for conv in model.modules():
            if _cpu_channels_last_unsafe(conv):
                conv.to(memory_format=torch.contiguous_format)
                if _standard_format_input not in conv._forward_pre_hooks.values():
                    conv.register_forward_pre_hook(_standard_format_input)
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
