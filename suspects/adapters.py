"""Any ``nn.Module`` as an :class:`~suspects.models.InspectableModel`: architectures from torchvision and timm.

``torchvision:NAME`` builds any torchvision classification constructor (``torchvision:mobilenet_v3_small``) and
``timm:NAME`` any of timm's (``timm:vit_tiny_patch16_224``), always without downloading weights: a user's checkpoint
supplies them. The network is wrapped in a :class:`LibraryModel`, which adds what this project needs and the
library does not know:

- the input normalisation (a :class:`~suspects.models.Normalize` with non-persistent buffers, as for the own
  architectures) and, for networks trained behind a resize (BackdoorBench's ViT sees CIFAR images at 224), an
  optional bilinear resize of the raw input;
- the classifier: the last ``nn.Linear`` in module order; penultimate features are its input;
- the feature map: the last module whose output is the 4-D map pooled into the head (found once by a probe
  forward pass), or for a transformer the token sequence (N, T, D);
- residual blocks, where the architecture has them, each with a skip scale ``gamma`` (the skip-connection ablation
  of Yang et al., ICASSP 2023, and shortcut suppression) applied through hooks, so the library's module and its
  state-dict keys stay untouched:

  * *identity-add* blocks, ``out = x + g(x)`` (torchvision's MobileNet / EfficientNet inverted residuals, ConvNeXt
    ``CNBlock``, ViT ``EncoderBlock``; timm's ConvNeXt, ViT and EfficientNet blocks): ``gamma * x + g(x)`` is
    ``out - (1 - gamma) * x``, a forward hook on the block;
  * *post-activation* ResNet blocks, ``out = act(r(x) + s(x))`` (torchvision's and timm's ``BasicBlock`` /
    ``Bottleneck``): a pre-hook on the final activation replaces its input ``r + s`` by ``r + gamma * s``.

  With ``gamma == 1`` the hooks return nothing, so the plain forward is bit for bit the library's.

The wrapped network sits under ``net``: every module and state-dict key of the wrapper is the library's with
``net.`` in front (:func:`to_wrapper_keys` adds it to a user's plain state dict; :func:`to_library_keys` removes it).

What a model can and cannot do is declared by :func:`suspects.models.missing_capabilities`, which every view and
defense asks before it runs ("not applicable to this model: <what is missing>").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LIBRARIES",
    "LibraryModel",
    "SkipScale",
    "is_library_arch",
    "build_library_model",
    "list_library_models",
    "to_wrapper_keys",
    "to_library_keys",
    "TRANSFORMER_LAYOUT",
]

LIBRARIES = ("torchvision", "timm")
PREFIX = "net."
TRANSFORMER_LAYOUT = "tokens"
_POOL_WORDS = ("Pool", "Flatten", "Dropout", "Identity")


def is_library_arch(name: str) -> bool:
    """Whether ``name`` is ``LIBRARY:CONSTRUCTOR`` for a supported library."""
    lib, sep, rest = str(name).partition(":")
    return bool(sep) and lib in LIBRARIES and bool(rest)


def list_library_models(library: str, pattern: str = "*") -> list[str]:
    """Classification constructors of ``library`` (``torchvision`` or ``timm``) matching ``pattern``."""
    if library == "torchvision":
        import fnmatch

        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        return sorted(n for n in names if fnmatch.fnmatch(n, pattern))
    if library == "timm":
        import timm

        return list(timm.list_models(pattern))
    raise ValueError(f"unknown library {library!r}; supported: {', '.join(LIBRARIES)}")


def _library_constructor(name: str):
    lib, _, ctor = name.partition(":")
    if lib == "torchvision":
        import torchvision

        try:
            return lib, ctor, torchvision.models.get_model_builder(ctor)
        except ValueError:
            raise ValueError(f"torchvision has no classification model {ctor!r} (see "
                             f"torchvision.models.list_models(); e.g. resnet18, mobilenet_v3_small, vit_b_16)") from None
    if lib == "timm":
        import timm

        if not timm.is_model(ctor):
            raise ValueError(f"timm has no model {ctor!r} (see timm.list_models(); e.g. resnet18, "
                             f"convnext_atto, vit_tiny_patch16_224)")
        return lib, ctor, None
    raise ValueError(f"unknown library {lib!r} in {name!r}; use torchvision:NAME or timm:NAME")


def _replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Give a torchvision network (built for RGB) ``in_channels`` inputs: its first convolution is rebuilt with the
    same settings and key name."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups if module.groups == 1 else in_channels,
                            module.bias is not None, module.padding_mode)
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, new)
            return
    raise ValueError("the network has no convolution to take the input channels")


class SkipScale:
    """A library block's skip scale, seen as the ``gamma`` attribute that the own blocks have (the module itself may
    have a ``gamma`` of its own, e.g. timm ConvNeXt's layer scale, so the scale lives in ``_lens_gamma``)."""

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def gamma(self) -> float:
        return float(self.module.__dict__.get("_lens_gamma", 1.0))

    @gamma.setter
    def gamma(self, value: float) -> None:
        self.module.__dict__["_lens_gamma"] = float(value)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


# --- skip-scale hooks (module-level functions: a deep copy or a pickle of the model keeps them working) ---------


def _identity_add_hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
    gamma = module.__dict__.get("_lens_gamma", 1.0)
    if gamma == 1.0 or not inputs or not isinstance(output, torch.Tensor):
        return None
    x = inputs[0]
    if not isinstance(x, torch.Tensor) or x.shape != output.shape:
        return None
    return output - (1.0 - gamma) * x


def _block_input_hook(module: nn.Module, inputs: tuple) -> None:
    module.__dict__["_lens_input"] = inputs[0] if module.__dict__.get("_lens_gamma", 1.0) != 1.0 else None
    module.__dict__["_lens_calls"] = 0


def _final_act_hook(act: nn.Module, inputs: tuple) -> Any:
    block = act.__dict__.get("_lens_owner")
    if block is None:
        return None
    calls = block.__dict__.get("_lens_calls", 0) + 1
    block.__dict__["_lens_calls"] = calls
    x = block.__dict__.get("_lens_input")
    if x is None or calls != act.__dict__.get("_lens_call_index", 1):
        return None
    gamma = block.__dict__.get("_lens_gamma", 1.0)
    downsample = getattr(block, "downsample", None)
    skip = downsample(x) if downsample is not None else x
    block.__dict__["_lens_input"] = None
    return (inputs[0] - (1.0 - gamma) * skip,) + tuple(inputs[1:])


def _is_transformer_block(m: nn.Module) -> bool:
    return (hasattr(m, "mlp") and (hasattr(m, "attn") or hasattr(m, "self_attention"))
            and any(isinstance(c, nn.LayerNorm) for c in m.children()))


def _skip_kind(m: nn.Module) -> str | None:
    """How ``m`` adds its skip: ``identity-add``, ``post-act`` (with the final activation), or None."""
    cls = type(m).__name__
    if getattr(m, "use_res_connect", False) is True or getattr(m, "has_skip", False) is True:
        return "identity-add"
    if cls in ("CNBlock", "EncoderBlock") or _is_transformer_block(m):
        return "identity-add"
    if cls == "ConvNeXtBlock" and isinstance(getattr(m, "shortcut", nn.Identity()), nn.Identity):
        return "identity-add"
    if cls in ("BasicBlock", "Bottleneck") and hasattr(m, "bn1") and hasattr(m, "conv1"):
        return "post-act"
    return None


def _final_activation(block: nn.Module) -> tuple[nn.Module, int] | None:
    """The activation applied to ``r(x) + s(x)`` and which of its calls in one forward that is."""
    basic = type(block).__name__ == "BasicBlock"
    if isinstance(getattr(block, "relu", None), nn.Module) and not hasattr(block, "act1"):
        return block.relu, 2 if basic else 3  # torchvision calls one ReLU module 2 (3) times; the last is the one
    act = getattr(block, "act2" if basic else "act3", None)  # timm: a module of its own
    return (act, 1) if isinstance(act, nn.Module) else None


class LibraryModel(nn.Module):
    """A torchvision / timm classifier (``net``) with normalisation, an optional input resize and the
    :class:`~suspects.models.InspectableModel` interface (see the module docstring)."""

    sequential_blocks = False  # the blocks cannot be run one after another from a stem: ablations run whole passes

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 input_shape: Sequence[int], num_classes: int, resize_to: int | None = None):
        super().__init__()
        from .models import Normalize

        self.normalize = Normalize(mean, std)
        self.net = net
        self.resize_to = int(resize_to) if resize_to else None
        self.input_shape = tuple(int(v) for v in input_shape)
        self.in_channels = self.input_shape[0]
        self.num_classes = int(num_classes)
        self._probe: dict[str, Any] | None = None
        self._blocks = self._find_blocks()

    # --- forward ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_to and x.shape[-1] != self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        return self.net(self.normalize(x))

    # --- structure -------------------------------------------------------------------------------------------

    def get_classifier(self) -> nn.Linear:
        last = None
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                last = m
        if last is None:
            from .models import ModelInterfaceError

            raise ModelInterfaceError(f"{type(self.net).__name__} has no nn.Linear classifier")
        return last

    def _classifier_root(self) -> str:
        """The top-level container of the classifier (``fc``, ``classifier``, ``heads``, ``head``)."""
        head = self.get_classifier()
        for name, m in self.named_modules():
            if m is head:
                parts = name.split(".")
                return ".".join(parts[:2])  # net.<top-level child>
        return ""

    def _find_blocks(self) -> list[tuple[str, nn.Module]]:
        found: list[tuple[str, nn.Module]] = []
        for name, m in self.named_modules():
            kind = _skip_kind(m) if name.startswith(PREFIX) else None
            if kind is None or any(name.startswith(f"{p}.") for p, _ in found):
                continue  # a block inside a block (a ViT MLP ...) is not a separate skip
            if kind == "identity-add":
                m.register_forward_hook(_identity_add_hook)
            else:
                act = _final_activation(m)
                if act is None:
                    continue
                module, index = act
                m.register_forward_pre_hook(_block_input_hook)
                module.register_forward_pre_hook(_final_act_hook)
                object.__setattr__(module, "_lens_owner", m)
                object.__setattr__(module, "_lens_call_index", index)
            m.__dict__.setdefault("_lens_gamma", 1.0)
            found.append((name, m))
        return found

    def blocks(self) -> list[tuple[str, SkipScale]]:
        """Residual blocks in forward order (``net.layer1.0``, ``net.features.3``, ``net.blocks.0`` ...), each with
        a skip scale ``gamma``; empty where the architecture has no skip connections (VGG, DenseNet)."""
        return [(name, SkipScale(m)) for name, m in self._blocks]

    def transformer_blocks(self) -> list[str]:
        return [name for name, m in self.named_modules() if name.startswith(PREFIX) and _is_transformer_block(m)]

    @property
    def layout(self) -> str:
        """``map`` for a convolutional feature map (N, C, h, w), ``tokens`` for a transformer's (N, T, D)."""
        return TRANSFORMER_LAYOUT if self.transformer_blocks() else "map"

    def probe(self) -> dict[str, Any]:
        """One forward pass on a blank input, recording which module ends with the feature map (cached)."""
        if self._probe is not None:
            return self._probe
        head_root = self._classifier_root()
        want_dims = 3 if self.layout == TRANSFORMER_LAYOUT else 4
        order: list[tuple[str, tuple[int, ...]]] = []
        handles = []
        for name, m in self.named_modules():
            if not name.startswith(PREFIX) or (head_root and (name == head_root or name.startswith(head_root + "."))):
                continue
            if any(w in type(m).__name__ for w in _POOL_WORDS):
                continue
            handles.append(m.register_forward_hook(
                lambda mod, i, o, n=name: order.append((n, tuple(o.shape))) if isinstance(o, torch.Tensor) else None))
        was = self.training
        self.eval()
        try:
            p = next(self.parameters())
            with torch.no_grad():
                self(torch.zeros(1, *self.input_shape, device=p.device, dtype=p.dtype))
        finally:
            for h in handles:
                h.remove()
            self.train(was)
        feats = [(n, s) for n, s in order if len(s) == want_dims]
        layer, shape = feats[-1] if feats else (None, None)
        self._probe = {"feature_layer": layer, "feature_shape": shape}
        return self._probe

    def feature_layer(self) -> str:
        """The module whose output is the last feature map (or token sequence) before the head."""
        layer = self.probe()["feature_layer"]
        if layer is None:
            from .models import ModelInterfaceError

            raise ModelInterfaceError(f"{type(self.net).__name__}: no feature map found before the classifier")
        return layer

    def feature_channels(self) -> int | None:
        shape = self.probe()["feature_shape"]
        if shape is None:
            return None
        return int(shape[-1] if self.layout == TRANSFORMER_LAYOUT else shape[1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature layer's output for raw [0, 1] images (one whole forward pass, read by a hook)."""
        captured: list[torch.Tensor] = []
        module = self.get_submodule(self.feature_layer())
        handle = module.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            self(x)
        finally:
            handle.remove()
        return captured[0]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        from .models import ModelInterfaceError

        raise ModelInterfaceError("a library model runs whole forward passes (no separate stem)")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        from .models import ModelInterfaceError

        raise ModelInterfaceError("a library model's head is not run apart from its body; use "
                                  "suspects.models.penultimate_features")

    def cam_target(self) -> tuple[str, Any]:
        """Grad-CAM's target layer and its reshape transform: the feature layer of a CNN; for a ViT the last
        block's first norm with the tokens laid out on their grid (as pytorch-grad-cam documents)."""
        if self.layout != TRANSFORMER_LAYOUT:
            return self.feature_layer(), None
        last = self.transformer_blocks()[-1]
        block = self.get_submodule(last)
        norm = next(n for n, c in block.named_children() if isinstance(c, nn.LayerNorm))
        return f"{last}.{norm}", tokens_to_grid

    def state_dict_for_library(self) -> dict[str, torch.Tensor]:
        """The weights with the library's own key names (what the library's constructor loads)."""
        return to_library_keys(self.state_dict())


def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
    """(N, T, D) tokens -> (N, D, g, g): the class / register tokens before the g x g patch grid are dropped."""
    if t.dim() != 3:
        return t
    n, tokens, d = t.shape
    g = int(math.isqrt(tokens))
    return t[:, tokens - g * g:, :].reshape(n, g, g, d).permute(0, 3, 1, 2)


def to_wrapper_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A library state dict's keys as the wrapper's (``net.`` in front), unless they have it already."""
    if state_dict and all(k.startswith(PREFIX) for k in state_dict):
        return dict(state_dict)
    return {PREFIX + k: v for k, v in state_dict.items()}


def to_library_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in state_dict.items()}


def build_library_model(name: str, num_classes: int = 10, in_channels: int = 3,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        input_size: int | Sequence[int] = 32, resize_to: int | None = None,
                        **kwargs: Any) -> LibraryModel:
    """``torchvision:NAME`` or ``timm:NAME`` built without weights and wrapped (see :class:`LibraryModel`).

    ``input_size`` is the raw image's height (and width), ``resize_to`` the size the network sees (None: the
    same); ``kwargs`` go to the library's constructor (e.g. ``width_mult`` for MobileNet, ``depth`` / ``img_size``
    for a timm ViT). A timm ViT is built for the size it sees unless ``img_size`` is given.
    """
    lib, ctor, builder = _library_constructor(name)
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    size = int(input_size[-1] if isinstance(input_size, Sequence) else input_size)
    seen = int(resize_to or size)
    mean = list(mean) if mean is not None else [0.0] * in_channels
    std = list(std) if std is not None else [1.0] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (one per input channel), got {len(mean)}/{len(std)}")
    try:
        if lib == "torchvision":
            if ctor.startswith("vit_") and "image_size" not in kwargs:
                kwargs = {**kwargs, "image_size": seen}
            net = builder(weights=None, num_classes=int(num_classes), **kwargs)
            if in_channels != 3:
                _replace_first_conv(net, int(in_channels))
        else:
            import timm

            if "img_size" not in kwargs and ("vit" in ctor or "deit" in ctor):
                kwargs = {**kwargs, "img_size": seen}
            net = timm.create_model(ctor, pretrained=False, num_classes=int(num_classes), in_chans=int(in_channels),
                                    **kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build {name} with {kwargs}: {err}") from None
    return LibraryModel(net, mean, std, (int(in_channels), size, size), int(num_classes), resize_to)
