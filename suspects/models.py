"""Model registry: named constructors for the classifiers Backdoor Lens inspects.

Every residual block computes ``residual(x) + gamma * skip(x)`` where ``gamma`` is a plain
float attribute (default 1.0, never trained). The skip-connection ablation of Yang et al.
("Backdoor Defense via Suppressing Model Shortcuts", ICASSP 2023) and shortcut suppression
set it through :func:`set_skip_gamma`.

Input normalisation is part of every model (a :class:`Normalize` layer with non-persistent
buffers, so state dicts keep BackdoorBench's key names), hence callers always feed raw images
in [0, 1].

Every architecture implements one explicit interface, :class:`InspectableModel`, with timm's method names
(``forward_features``, ``forward_head(x, pre_logits)``, ``get_classifier``) plus ``forward_stem``, ``blocks`` and
``feature_layer``. Analyses and defenses call it (through :func:`model_api`) instead of guessing attribute names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Normalize",
    "ResidualBlock",
    "InspectableModel",
    "ModelInterfaceError",
    "INTERFACE_METHODS",
    "model_api",
    "create_model",
    "list_models",
    "register_model",
    "residual_blocks",
    "list_residual_blocks",
    "set_skip_gamma",
    "reset_skip_gammas",
    "get_skip_gammas",
    "penultimate_features",
    "CAPABILITIES",
    "NotApplicableError",
    "missing_capabilities",
    "not_applicable_reason",
    "require",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator adding a constructor to the registry under its function name (a name that is already taken is
    refused with :class:`suspects.plugins.PluginError`)."""
    from .plugins import PluginError, claim_name

    if not callable(fn):
        raise PluginError(f"architecture {fn!r} is not callable")
    _REGISTRY[claim_name("architectures", _REGISTRY, getattr(fn, "__name__", None), fn)] = fn
    return fn


def _plugins() -> None:
    """Load the ``backdoor_lens.architectures`` entry points once (built-ins first, then installed plugins)."""
    from .plugins import load_plugins

    load_plugins("architectures", _REGISTRY, register_model, builtin_modules=(__name__, "suspects.tv_resnet"))


def list_models(pattern: str = "*") -> list[str]:
    """Names of registered architectures matching a shell-style ``pattern``."""
    _plugins()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build an architecture: a registered one, e.g. ``create_model('preact_resnet18', num_classes=10, width=16)``,
    or a library's, ``create_model('torchvision:mobilenet_v3_small', num_classes=10, input_size=32)`` (no weights
    are downloaded; see :mod:`suspects.adapters`)."""
    from .adapters import build_library_model, is_library_arch

    if is_library_arch(name):
        model = build_library_model(name, **kwargs)
        model.arch_name = name  # type: ignore[attr-defined]
        model.arch_kwargs = dict(kwargs)  # type: ignore[attr-defined]
        return model
    _plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; registered: {', '.join(list_models())}, or "
                         f"torchvision:NAME / timm:NAME for any model of those libraries")
    model = _REGISTRY[name](**kwargs)
    model.arch_name = name  # type: ignore[attr-defined]
    model.arch_kwargs = dict(kwargs)  # type: ignore[attr-defined]
    return model


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; buffers are not saved in the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have one value per channel")
        if any(s <= 0 for s in std):
            raise ValueError("std values must be positive")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class ResidualBlock(nn.Module):
    """Base class of blocks whose output is ``residual(x) + gamma * skip(x)``."""

    gamma: float = 1.0

    def scaled_skip(self, skip: torch.Tensor) -> torch.Tensor:
        # gamma == 1 must give the plain forward bit for bit, so skip the multiply then.
        return skip if self.gamma == 1.0 else skip * self.gamma


@runtime_checkable
class InspectableModel(Protocol):
    """What Backdoor Lens needs from a classifier (method names after timm's ``forward_features`` /
    ``forward_head`` / ``get_classifier``). Inputs are raw [0, 1] images; ``model(x)`` must equal
    ``forward_head(forward_features(x))``.
    """

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input through the stem: the input of the first residual block (of the feature body for a
        network without skips). With residual blocks, ``forward_features(x)`` is ``blocks()`` applied in order to
        ``forward_stem(x)``."""
        ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, C, h, w), before pooling."""
        ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling and the classifier applied to a ``forward_features`` map; with ``pre_logits`` the pooled
        penultimate features (N, D), the classifier's input."""
        ...

    def get_classifier(self) -> nn.Linear:
        """The final linear layer (D -> number of classes)."""
        ...

    def blocks(self) -> list[tuple[str, ResidualBlock]]:
        """The residual blocks in forward order, ``[("layer1.0", block), ...]`` (empty without skip connections);
        each block's skip scale is its ``gamma``."""
        ...

    def feature_layer(self) -> str:
        """Name (in ``named_modules()``) of the module whose output is ``forward_features(x)``: the 'last
        convolutional layer' that Fine-Pruning and l_inf pruning hook."""
        ...


INTERFACE_METHODS = ("forward_stem", "forward_features", "forward_head", "get_classifier", "blocks", "feature_layer")


class ModelInterfaceError(TypeError, ValueError):
    """A model lacks part of :class:`InspectableModel` (a TypeError; a ValueError too, for older callers)."""


def model_api(model: nn.Module) -> InspectableModel:
    """``model`` itself, checked against :class:`InspectableModel`; a model lacking part of it raises
    :class:`ModelInterfaceError` naming the missing methods."""
    if isinstance(model, InspectableModel):
        return model
    missing = [name for name in INTERFACE_METHODS if not callable(getattr(model, name, None))]
    raise ModelInterfaceError(
        f"{type(model).__name__} does not implement the Backdoor Lens model interface "
        f"(suspects.models.InspectableModel): missing {', '.join(missing)}. Every registered architecture has it; a "
        f"new one needs these methods (see suspects/models.py)")


class PreActBlock(ResidualBlock):
    """Pre-activation basic block (He et al., 2016), BackdoorBench key names."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))
        self.gamma = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.scaled_skip(skip)


class BasicBlock(ResidualBlock):
    """Post-activation basic block of the CIFAR ResNet (``layerX.Y.shortcut`` always present)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.gamma = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.scaled_skip(self.shortcut(x)))


class _CifarResNet(nn.Module):
    """Shared body of the CIFAR-style ResNets: 3x3 stem, no max-pool, four stages, ``linear`` head."""

    def __init__(
        self,
        block: type[ResidualBlock],
        num_blocks: Sequence[int],
        num_classes: int,
        in_channels: int,
        width: int,
        mean: Sequence[float],
        std: Sequence[float],
        stem_bn: bool,
    ):
        super().__init__()
        _check_args(num_classes, in_channels, width, mean, std)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.stem_bn = stem_bn
        if stem_bn:
            self.bn1 = nn.BatchNorm2d(width)
        self.in_planes = width
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, width * 2, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, width * 4, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, width * 8, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(width * 8, num_classes)
        self.num_classes = num_classes
        self.in_channels = in_channels

    def _make_layer(self, block: type[ResidualBlock], planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and apply the first convolution: the input of ``layer1.0``."""
        out = self.conv1(self.normalize(x))
        return F.relu(self.bn1(out)) if self.stem_bn else out

    def blocks(self) -> list[tuple[str, ResidualBlock]]:
        """The residual blocks in forward order, e.g. ``[("layer1.0", block), ...]``."""
        return [(f"layer{i}.{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(self, f"layer{i}"))]

    def feature_layer(self) -> str:
        """The last residual block (``layer4.1``), whose output is pooled into the classifier."""
        return self.blocks()[-1][0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output map of raw [0, 1] images."""
        return self.layer4(self.layer3(self.layer2(self.layer1(self.forward_stem(x)))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then ``linear`` unless ``pre_logits``."""
        h = torch.flatten(self.avgpool(x), 1)
        return h if pre_logits else self.linear(h)

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_args(num_classes: int, in_channels: int, width: int, mean, std) -> None:
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if int(width) < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (one per input channel), got {len(mean)}/{len(std)}")


def _default_norm(in_channels: int, mean, std) -> tuple[list[float], list[float]]:
    mean = list(mean) if mean is not None else [0.5] * in_channels
    std = list(std) if std is not None else [0.5] * in_channels
    return mean, std


@register_model
def preact_resnet18(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """PreActResNet-18 with BackdoorBench's key names (no final BN; ``shortcut.0`` only where it downsamples)."""
    mean, std = _default_norm(in_channels, mean, std)
    return _CifarResNet(PreActBlock, [2, 2, 2, 2], num_classes, in_channels, width, mean, std, stem_bn=False)


@register_model
def resnet18(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """CIFAR-style ResNet-18 (He et al., 2016): 3x3 stem, no max-pool, ``layerX.Y.shortcut``, ``linear``."""
    mean, std = _default_norm(in_channels, mean, std)
    return _CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width, mean, std, stem_bn=True)


class VGG(nn.Module):
    """VGG with batch norm (Simonyan & Zisserman, 2015), CIFAR-sized head; it has no skip connections."""

    def __init__(self, cfg: Sequence[int | str], num_classes: int, in_channels: int, width: int, mean, std):
        super().__init__()
        _check_args(num_classes, in_channels, width, mean, std)
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                out = int(v) * width // 64
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                c = out
        self.features_body = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(c, num_classes)
        self.num_classes = num_classes
        self.in_channels = in_channels

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalisation only: the input of ``features_body``."""
        return self.normalize(x)

    def blocks(self) -> list[tuple[str, ResidualBlock]]:
        """None: VGG has no skip connections."""
        return []

    def feature_layer(self) -> str:
        return "features_body"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional body's output map (after its last max-pool) of raw [0, 1] images."""
        return self.features_body(self.forward_stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then ``linear`` unless ``pre_logits``."""
        h = torch.flatten(self.avgpool(x), 1)
        return h if pre_logits else self.linear(h)

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def vgg11_bn(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """VGG-11 with batch norm; ``width`` scales every stage (64 = the paper's channel counts)."""
    mean, std = _default_norm(in_channels, mean, std)
    cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    return VGG(cfg, num_classes, in_channels, width, mean, std)


# --- skip-connection helpers -------------------------------------------------------------------


def residual_blocks(model: nn.Module) -> Iterator[tuple[str, ResidualBlock]]:
    """``(name, block)`` for every residual block, in forward order (``layer1.0``, ``layer1.1``, ...)."""
    yield from model_api(model).blocks()


def list_residual_blocks(model: nn.Module) -> list[str]:
    """Names of the residual blocks (empty for a network without skip connections)."""
    return [name for name, _ in residual_blocks(model)]


def _block(model: nn.Module, name: str) -> ResidualBlock:
    blocks = dict(residual_blocks(model))
    if name not in blocks:
        raise KeyError(f"no residual block named {name!r}; blocks: {', '.join(blocks) or '(none)'}")
    return blocks[name]


def set_skip_gamma(model: nn.Module, name: str, gamma: float) -> None:
    """Scale the skip output of block ``name`` by ``gamma`` (1.0 restores the plain block)."""
    gamma = float(gamma)
    if not gamma == gamma:  # NaN
        raise ValueError("gamma must be a number")
    _block(model, name).gamma = gamma


def reset_skip_gammas(model: nn.Module) -> None:
    """Set every block's gamma back to 1.0."""
    for _, block in residual_blocks(model):
        block.gamma = 1.0


def get_skip_gammas(model: nn.Module, non_default_only: bool = False) -> dict[str, float]:
    """Current gamma per block; with ``non_default_only`` only those != 1.0 (what checkpoints record)."""
    gammas = {name: float(b.gamma) for name, b in residual_blocks(model)}
    if non_default_only:
        gammas = {k: v for k, v in gammas.items() if v != 1.0}
    return gammas


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input of the final linear layer for raw [0, 1] images (``forward_head(forward_features(x), pre_logits=True)``
    for the own architectures; for any model the classifier's input, read by a hook)."""
    api = model_api(model)
    if getattr(model, "sequential_blocks", True):
        return api.forward_head(api.forward_features(x), pre_logits=True)
    captured: list[torch.Tensor] = []
    handle = api.get_classifier().register_forward_pre_hook(lambda m, i: captured.append(i[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[-1].flatten(1)


# --- what a model can do: every view and defense asks before it runs -----------------------------------------

CAPABILITIES = {
    "module_hooks": "module hooks (an exported program runs as one graph)",
    "linear_head": "a linear classifier (an nn.Linear as the last layer)",
    "residual_blocks": "residual blocks with a skip connection to scale",
    "batchnorm": "BatchNorm2d layers",
    "feature_map": "a convolutional feature map before the head (a 4-D map, not tokens)",
    "pooled_head": "a head that average-pools the last feature map straight into the classifier (its inputs are "
                   "the feature map's channels)",
    "convolutions": "convolution layers",
    "trainable": "trainable parameters",
    "rebuildable": "an architecture that can be rebuilt from its card (a repaired model is stored as weights and a "
                   "card; a torch.export program cannot be)",
}


class NotApplicableError(ModelInterfaceError):
    """A view or defense needs something the model does not have; the message says what."""


def _has_capability(model: nn.Module, need: str) -> bool:
    if need == "module_hooks":
        return not getattr(model, "exported_program", False)
    if need == "trainable":
        return any(p.requires_grad for p in model.parameters())
    if need == "rebuildable":
        return not getattr(model, "exported_program", False)
    if not _has_capability(model, "module_hooks"):
        return False
    if need == "batchnorm":
        return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if need == "convolutions":
        return any(isinstance(m, nn.Conv2d) for m in model.modules())
    try:
        api = model_api(model)
        if need == "linear_head":
            return isinstance(api.get_classifier(), nn.Linear)
        if need == "residual_blocks":
            return bool(api.blocks())
        layout = getattr(model, "layout", "map")
        if need == "feature_map":
            api.feature_layer()
            return layout == "map"
        if need == "pooled_head":
            if layout != "map":
                return False
            channels = model.feature_channels() if hasattr(model, "feature_channels") else None
            return channels is None or channels == api.get_classifier().in_features
    except (ModelInterfaceError, StopIteration, RuntimeError, IndexError):
        return False
    raise ValueError(f"unknown capability {need!r}; known: {', '.join(CAPABILITIES)}")


def missing_capabilities(model: nn.Module, needs: Sequence[str]) -> list[str]:
    """Of ``needs`` (names of :data:`CAPABILITIES`), those ``model`` lacks (empty: everything applies)."""
    return [n for n in needs if not _has_capability(model, n)]


def not_applicable_reason(model: nn.Module, needs: Sequence[str]) -> str | None:
    """``"not applicable to this model: it has no <what>"`` for the first missing capability, else None."""
    missing = missing_capabilities(model, needs)
    if not missing:
        return None
    arch = getattr(model, "arch_name", type(model).__name__)
    what = "; ".join(CAPABILITIES[m] for m in missing)
    return f"not applicable to this model ({arch}): it needs {what}"


def require(model: nn.Module, needs: Sequence[str]) -> None:
    """Raise :class:`NotApplicableError` when ``model`` lacks one of ``needs``."""
    reason = not_applicable_reason(model, needs)
    if reason:
        raise NotApplicableError(reason)
