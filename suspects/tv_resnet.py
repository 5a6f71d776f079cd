"""ResNet-18 in torchvision's layout (7x7 stride-2 stem and 3x3 max-pool), the network BackdoorBench calls ``resnet18``.

It reuses the project's post-activation :class:`~suspects.models.BasicBlock` (so every block has a skip scale
``gamma``) and its names: torchvision's ``layerX.Y.downsample.{0,1}`` is ``layerX.Y.shortcut.{0,1}`` here and
``fc`` is ``linear``. :func:`torchvision_key` / :func:`project_key` translate between the two. It implements
:class:`~suspects.models.InspectableModel` through its base class, with its own ``forward_stem``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models import BasicBlock, _CifarResNet, _default_norm, register_model

__all__ = ["resnet18_torchvision", "torchvision_key", "project_key"]


class TorchvisionStemResNet(_CifarResNet):
    """CIFAR ResNet body with ImageNet's stem: conv 7x7 stride 2 (``conv1``), ``bn1``, ReLU, max-pool 3x3 stride 2."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int, in_channels: int, width: int,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__(BasicBlock, num_blocks, num_classes, in_channels, width, mean, std, stem_bn=True)
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)  # replaces the 3x3 stem, same key
        self.maxpool = nn.MaxPool2d(3, 2, 1)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise, convolve, BN + ReLU, max-pool: the input of ``layer1.0``."""
        return self.maxpool(super().forward_stem(x))


@register_model
def resnet18_torchvision(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """ResNet-18 with torchvision's ImageNet stem (BackdoorBench's ``resnet18``); keys ``shortcut``/``linear``."""
    mean, std = _default_norm(in_channels, mean, std)
    return TorchvisionStemResNet([2, 2, 2, 2], num_classes, in_channels, width, mean, std)


def project_key(key: str) -> str:
    """torchvision key -> this project's (``downsample`` -> ``shortcut``, ``fc`` -> ``linear``)."""
    if key.startswith("fc."):
        return "linear." + key[3:]
    return key.replace(".downsample.", ".shortcut.")


def torchvision_key(key: str) -> str:
    """This project's key -> torchvision's (the inverse of :func:`project_key`)."""
    if key.startswith("linear."):
        return "fc." + key[7:]
    return key.replace(".shortcut.", ".downsample.")
