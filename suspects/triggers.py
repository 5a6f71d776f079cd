"""Backdoor triggers (attacks): a registry of deterministic transforms of [0, 1] images.

Each trigger knows its label rule (all-to-one: every poisoned input goes to ``target``;
all-to-all: label ``y`` goes to ``(y + 1) % K``), which training samples it may poison
(clean-label SIG poisons only target-class images and keeps their labels), and how to
serialise itself into the spec stored in a suspect card.

References: BadNets (Gu et al., 2017), Blended (Chen et al., 2017), SIG (Barni et al., 2019),
WaNet (Nguyen & Tran, ICLR 2021), TrojanNN (Liu et al., NDSS 2018).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Trigger",
    "PoisonPlan",
    "register_trigger",
    "list_triggers",
    "get_trigger_class",
    "make_trigger",
    "trigger_from_spec",
    "MAPPINGS",
    "RecoveredTrigger",
]

MAPPINGS = ("all-to-one", "all-to-all")
_REGISTRY: dict[str, type[Trigger]] = {}


def register_trigger(cls: type[Trigger]) -> type[Trigger]:
    """Class decorator: check ``cls`` (a :class:`Trigger` with ``apply``) and register it under ``cls.name``; a name
    that is already taken is refused (:class:`suspects.plugins.PluginError`)."""
    from .plugins import PluginError, claim_name

    if not (isinstance(cls, type) and issubclass(cls, Trigger)):
        raise PluginError(f"{cls!r} is not a subclass of suspects.triggers.Trigger")
    if cls.apply is Trigger.apply:
        raise PluginError(f"attack {cls.__qualname__} does not implement apply(x)")
    if not isinstance(cls.defaults, dict):
        raise PluginError(f"attack {cls.__qualname__}: defaults must be a dict")
    _REGISTRY[claim_name("attacks", _REGISTRY, cls.name, cls)] = cls
    return cls


def _plugins() -> None:
    """Load the ``backdoor_lens.attacks`` entry points once (built-ins: this module; then installed plugins)."""
    from .plugins import load_plugins

    load_plugins("attacks", _REGISTRY, register_trigger, builtin_modules=(__name__, "suspects.attacks",
                                                                         "suspects.inputaware"))


def list_triggers(include_recovered: bool = False) -> list[str]:
    """Registered attacks (those a suspect can be trained with; ``include_recovered`` adds reverse-engineered ones)."""
    _plugins()
    return sorted(n for n, cls in _REGISTRY.items() if include_recovered or not cls.recovered)


def get_trigger_class(name: str) -> type[Trigger]:
    """The registered attack class ``name`` (built-in or plugin)."""
    _plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; registered: {', '.join(list_triggers())}")
    return _REGISTRY[name]


@dataclass
class PoisonPlan:
    """Which training indices carry the trigger, and (WaNet) which get the noise warp with their own label."""

    poison_idx: torch.Tensor
    noise_idx: torch.Tensor


class Trigger:
    """Base class. Subclasses set ``name``, ``defaults`` and implement :meth:`apply`."""

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""
    recovered: ClassVar[bool] = False  # reverse-engineered from a model, not the attack's known trigger

    def __init__(self, input_shape: Sequence[int], num_classes: int, target: int = 0,
                 mapping: str = "all-to-one", **params: Any):
        self.input_shape = tuple(int(v) for v in input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
        self.num_classes = int(num_classes)
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
        if not 0 <= int(target) < self.num_classes:
            raise ValueError(f"target class must lie in [0, {self.num_classes}), got {target}")
        if self.clean_label and mapping != "all-to-one":
            raise ValueError(f"{self.name} is a clean-label attack and supports only all-to-one")
        self.target = int(target)
        self.mapping = mapping
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; known: {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}
        self._validate()

    # -- subclass API ------------------------------------------------------------------------------
    def _validate(self) -> None:
        pass

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of a batch ``x`` (B, C, H, W) in [0, 1]; deterministic."""
        raise NotImplementedError

    # -- shared behaviour ----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} trigger built for input {self.input_shape}, got {tuple(x.shape[1:])}")
        out = self.apply(x).clamp_(0.0, 1.0)
        return out[0] if squeeze else out

    def target_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Label the attacker wants for triggered inputs whose true labels are ``labels``."""
        labels = torch.as_tensor(labels)
        if self.mapping == "all-to-one":
            return torch.full_like(labels, self.target)
        return (labels + 1) % self.num_classes

    def test_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Test samples that count for ASR / RA (all-to-one excludes the target class)."""
        labels = torch.as_tensor(labels)
        if self.mapping == "all-to-one":
            return labels != self.target
        return torch.ones_like(labels, dtype=torch.bool)

    def poison_candidates(self, labels: torch.Tensor) -> torch.Tensor:
        """Training samples that may be poisoned."""
        labels = torch.as_tensor(labels)
        if self.clean_label:
            return labels == self.target
        return self.test_mask(labels)

    def plan(self, labels: torch.Tensor, rate: float, seed: int = 0,
             exclude: torch.Tensor | None = None) -> PoisonPlan:
        """Choose ``round(rate * N)`` poisoned training indices (never from ``exclude``)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"poisoning rate must lie in [0, 1], got {rate}")
        labels = torch.as_tensor(labels)
        eligible = self.poison_candidates(labels)
        if exclude is not None and len(exclude):
            eligible[torch.as_tensor(exclude, dtype=torch.long)] = False
        candidates = torch.nonzero(eligible).flatten()
        n = int(round(rate * len(labels)))
        if n > len(candidates):
            raise ValueError(f"{self.name}: poisoning rate {rate} asks for {n} samples but only "
                             f"{len(candidates)} are eligible" + (" (target-class images)" if self.clean_label else ""))
        gen = torch.Generator().manual_seed(int(seed))
        poison = candidates[torch.randperm(len(candidates), generator=gen)[:n]].sort().values
        return PoisonPlan(poison, self._noise_plan(labels, poison, exclude, gen))

    def _noise_plan(self, labels, poison, exclude, gen) -> torch.Tensor:
        return torch.empty(0, dtype=torch.long)

    def _extra_plan(self, labels, poison, exclude, gen, ratio: float) -> torch.Tensor:
        """``round(ratio * len(poison))`` further training indices (not poisoned, not excluded) that keep their
        label: WaNet's noise samples, BppAttack's negatives, the adaptive attacks' cover samples."""
        n_extra = int(round(len(poison) * float(ratio)))
        free = torch.ones(len(labels), dtype=torch.bool)
        free[poison] = False
        if exclude is not None and len(exclude):
            free[torch.as_tensor(exclude, dtype=torch.long)] = False
        candidates = torch.nonzero(free).flatten()
        n_extra = min(n_extra, len(candidates))
        return candidates[torch.randperm(len(candidates), generator=gen)[:n_extra]].sort().values

    noise_partners: ClassVar[bool] = False
    """True: :meth:`apply_noise` also takes ``partners``, one other training image per sample (BppAttack)."""

    def apply_noise(self, x: torch.Tensor, seeds: Sequence[int], partners: torch.Tensor | None = None) -> torch.Tensor:
        """Transform of the label-keeping extra samples (WaNet noise, BppAttack negatives, adaptive cover samples);
        identity for triggers without them. ``seeds`` make each sample's randomness reproducible."""
        return x

    def apply_train(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Triggered copy of poisoned *training* samples; the test-time trigger :meth:`apply` by default. Attacks whose
        training trigger differs per sample (Adaptive-Blend's masked pieces) override it; ``seeds`` as above."""
        return self(x)

    joint_training: ClassVar[bool] = False
    """True: parts of the trigger are trained together with the classifier (IAD's generators). Then
    :func:`suspects.training.train_suspect` gives the classifier clean images and calls :meth:`joint_trainer`, whose
    result supplies ``loss(model, x, y, roles)`` per batch (roles: 0 clean, 1 poisoned, 2 noise/cross),
    ``after_step()`` (run by :func:`~suspects.training.fit` after each step) and ``finish()``."""

    def joint_trainer(self, images: torch.Tensor, *, device: torch.device | str, batch_size: int, seed: int,
                      max_steps: int | None = None, total_steps: int | None = None,
                      augment: Any = None, progress: Any = None) -> Any:
        """Prepare joint training on the clean training ``images`` (see :attr:`joint_training`)."""
        raise NotImplementedError(f"{self.name} is not trained jointly with the classifier")

    def footprint(self, x: torch.Tensor | None = None, tol: float = 1.0 / 255) -> torch.Tensor:
        """(H, W) bool map of pixels the trigger changes (on ``x``, or on mid-grey and random images)."""
        if x is None:
            g = torch.Generator().manual_seed(0)
            x = torch.cat([torch.full((1, *self.input_shape), 0.5),
                           torch.rand((4, *self.input_shape), generator=g)])
        diff = (self(x) - x).abs().amax(dim=1)
        return (diff > tol).any(dim=0)

    sample_specific: ClassVar[bool] = False
    """True: the test-time trigger puts its pixels somewhere else on every image (IAD's generated masks, Nguyen &
    Tran NeurIPS 2020), so a view that measures what falls on the trigger must use each image's own
    :meth:`footprints` rather than one shared :meth:`footprint`."""

    def footprints(self, x: torch.Tensor, tol: float = 1.0 / 255) -> torch.Tensor:
        """(B, H, W) bool: the pixels the trigger changes on each image of ``x`` (B, C, H, W). By default the one
        shared footprint of the batch (:meth:`footprint` of ``x``) repeated; sample-specific triggers
        (:attr:`sample_specific`) give each image its own."""
        x = x if x.dim() == 4 else x.unsqueeze(0)
        fp = self.footprint(x, tol)
        return fp.unsqueeze(0).expand(len(x), *fp.shape).clone()

    def spec(self) -> dict[str, Any]:
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params.items()}
        return {"name": self.name, "target": self.target, "mapping": self.mapping, "params": params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target}, mapping={self.mapping!r}, params={self.params})"


def make_trigger(name: str, input_shape: Sequence[int], num_classes: int, target: int = 0,
                 mapping: str = "all-to-one", **params: Any) -> Trigger:
    """Build a registered trigger, e.g. ``make_trigger('badnets', (1, 28, 28), 10, size=3)``."""
    return get_trigger_class(name)(input_shape, num_classes, target=target, mapping=mapping, **params)


def trigger_from_spec(spec: dict[str, Any], input_shape: Sequence[int], num_classes: int) -> Trigger:
    return make_trigger(spec["name"], input_shape, num_classes, target=spec.get("target", 0),
                        mapping=spec.get("mapping", "all-to-one"), **spec.get("params", {}))


def _corner_offset(position: str | Sequence[int], size: tuple[int, int], hw: tuple[int, int],
                   margin: int) -> tuple[int, int]:
    (ph, pw), (h, w) = size, hw
    if isinstance(position, str):
        rows = {"top": margin, "bottom": h - ph - margin, "center": (h - ph) // 2}
        cols = {"left": margin, "right": w - pw - margin, "center": (w - pw) // 2}
        parts = position.split("-") if position != "center" else ["center", "center"]
        if len(parts) != 2 or parts[0] not in rows or parts[1] not in cols:
            raise ValueError(f"position must be like 'bottom-right', 'top-left', 'center' or [row, col]; got {position!r}")
        r, c = rows[parts[0]], cols[parts[1]]
    else:
        r, c = (int(v) for v in position)
    if r < 0 or c < 0 or r + ph > h or c + pw > w:
        raise ValueError(f"patch of size {size} at ({r}, {c}) does not fit an image of {hw}")
    return r, c


def _pattern(kind: str | list, size: int, channels: int) -> torch.Tensor:
    if isinstance(kind, list):
        arr = torch.tensor(kind, dtype=torch.float32)
        if arr.dim() == 2:
            arr = arr.expand(channels, *arr.shape)
        if arr.shape != (channels, size, size):
            raise ValueError(f"pattern must be {size}x{size} (or {channels}x{size}x{size}), got {tuple(arr.shape)}")
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError("pattern values must lie in [0, 1]")
        return arr.clone()
    if kind == "white":
        return torch.ones(channels, size, size)
    if kind == "black":
        return torch.zeros(channels, size, size)
    if kind == "checkerboard":
        idx = torch.arange(size)
        return ((idx[:, None] + idx[None, :]) % 2 == 0).float().expand(channels, size, size).clone()
    raise ValueError(f"pattern must be 'white', 'black', 'checkerboard' or a size x size list; got {kind!r}")


@register_trigger
class BadNets(Trigger):
    """BadNets (Gu et al., 2017): a small patch stamped on the image; default a 3x3 white square, bottom-right."""

    name = "badnets"
    description = "a small patch (default 3x3 white, bottom-right corner) stamped on the image"
    defaults = {"size": 3, "position": "bottom-right", "pattern": "white", "margin": 0}

    def _validate(self) -> None:
        p = self.params
        if int(p["size"]) < 1:
            raise ValueError("badnets size must be >= 1 pixel")
        self.size = int(p["size"])
        self.row, self.col = _corner_offset(p["position"], (self.size, self.size), self.input_shape[1:], int(p["margin"]))
        self.patch = _pattern(p["pattern"], self.size, self.input_shape[0])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, :, self.row:self.row + self.size, self.col:self.col + self.size] = self.patch.to(x)
        return out


@register_trigger
class Blended(Trigger):
    """Blended (Chen et al., 2017): ``(1 - alpha) * x + alpha * pattern``; the pattern is an image file or seeded noise."""

    name = "blended"
    description = "a full-image pattern (seeded noise or a picture) blended in with weight alpha"
    defaults = {"alpha": 0.2, "pattern": "noise", "pattern_seed": 0}

    def _validate(self) -> None:
        alpha = float(self.params["alpha"])
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"blended alpha must lie in (0, 1], got {alpha}")
        self.alpha = alpha
        c, h, w = self.input_shape
        src = self.params["pattern"]
        if src == "noise":
            g = torch.Generator().manual_seed(int(self.params["pattern_seed"]))
            self.pattern = torch.rand((c, h, w), generator=g)
        else:
            from PIL import Image

            path = Path(str(src)).expanduser()
            if not path.is_file():
                raise ValueError(f"blended pattern image {path} not found (use 'noise' or an image path)")
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
            self.pattern = torch.from_numpy(arr[None] if c == 1 else arr.transpose(2, 0, 1).copy())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.alpha) * x + self.alpha * self.pattern.to(x)

    def footprint(self, x: torch.Tensor | None = None, tol: float = 1.0 / 255) -> torch.Tensor:
        return torch.ones(self.input_shape[1:], dtype=torch.bool)


@register_trigger
class SIG(Trigger):
    """SIG (Barni et al., 2019): a horizontal sinusoid ``delta * sin(2 pi j f / W)``; clean-label.

    ``delta`` is in pixel units of 1/255 (BackdoorBench default 40), ``f`` the number of periods across the width.
    """

    name = "sig"
    clean_label = True
    description = "a faint horizontal sinusoidal signal added to the whole image (clean-label)"
    defaults = {"delta": 40.0, "f": 6.0}

    def _validate(self) -> None:
        if not 0 < float(self.params["delta"]) <= 255:
            raise ValueError("sig delta must lie in (0, 255] (pixel units)")
        if float(self.params["f"]) <= 0:
            raise ValueError("sig frequency f must be > 0")
        w = self.input_shape[2]
        j = torch.arange(w, dtype=torch.float32)
        self.signal = (float(self.params["delta"]) / 255.0) * torch.sin(2 * math.pi * j * float(self.params["f"]) / w)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.signal.to(x).view(1, 1, 1, -1)

    def footprint(self, x: torch.Tensor | None = None, tol: float = 1.0 / 255) -> torch.Tensor:
        return torch.ones(self.input_shape[1:], dtype=torch.bool)


@register_trigger
class WaNet(Trigger):
    """WaNet (Nguyen & Tran, ICLR 2021): a smooth random warping field; noise mode adds random warps to
    ``cross_ratio`` times as many clean samples, which keep their labels, so the model learns the exact field.

    ``k`` is the control grid size, ``s`` the warp strength, ``grid_rescale`` the clamp factor (paper: 1).
    """

    name = "wanet"
    description = "an imperceptible smooth warp of the image"
    defaults = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0, "field_seed": 0}

    def _validate(self) -> None:
        p = self.params
        if int(p["k"]) < 2:
            raise ValueError("wanet k must be >= 2")
        if float(p["s"]) <= 0:
            raise ValueError("wanet s must be > 0")
        if float(p["cross_ratio"]) < 0:
            raise ValueError("wanet cross_ratio must be >= 0")
        _, h, w = self.input_shape
        g = torch.Generator().manual_seed(int(p["field_seed"]))
        ins = torch.rand((1, 2, int(p["k"]), int(p["k"])), generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise_grid = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=2)[None]
        scale = torch.tensor([w, h], dtype=torch.float32)
        grid = identity + float(p["s"]) * noise_grid / scale * float(p["grid_rescale"])
        self.grid = grid.clamp(-1, 1)
        self._scale = scale

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(x).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def _noise_plan(self, labels, poison, exclude, gen) -> torch.Tensor:
        return self._extra_plan(labels, poison, exclude, gen, float(self.params["cross_ratio"]))

    def apply_noise(self, x: torch.Tensor, seeds: Sequence[int], partners: torch.Tensor | None = None) -> torch.Tensor:
        _, h, w = self.input_shape
        offsets = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            offsets.append((torch.rand((h, w, 2), generator=g) * 2 - 1) / self._scale)
        grid = (self.grid + torch.stack(offsets)).clamp(-1, 1).to(x)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


@register_trigger
class Trojan(Trigger):
    """TrojanNN-style (Liu et al., NDSS 2018) fixed watermark patch: a ring-and-cross logo pasted with opacity ``alpha``.

    The original optimises the patch against a victim network; here the patch is a fixed, deterministic
    logo (``size`` pixels, default a fifth of the image side) so suspects stay reproducible. The optimised version
    (BackdoorBench's) is ``trojannn`` in :mod:`suspects.attacks`.
    """

    name = "trojan"
    description = "a fixed watermark-like logo patch (ring and cross) in a corner"
    defaults = {"size": 0, "position": "bottom-right", "alpha": 1.0, "margin": 1}

    def _validate(self) -> None:
        _, h, w = self.input_shape
        size = int(self.params["size"]) or max(4, min(h, w) // 5)
        if size < 3:
            raise ValueError("trojan size must be >= 3 pixels (0 picks a fifth of the image side)")
        alpha = float(self.params["alpha"])
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"trojan alpha must lie in (0, 1], got {alpha}")
        self.size, self.alpha = size, alpha
        self.row, self.col = _corner_offset(self.params["position"], (size, size), (h, w), int(self.params["margin"]))
        c = (size - 1) / 2
        yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
        r = torch.sqrt((yy - c) ** 2 + (xx - c) ** 2)
        ring = (r >= c - 0.9) & (r <= c + 0.4)
        cross = ((yy - c).abs() < 0.6) | ((xx - c).abs() < 0.6)
        self.logo = (ring | (cross & (r <= c))).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        region = out[:, :, self.row:self.row + self.size, self.col:self.col + self.size]
        logo = self.logo.to(x)
        mask = logo * self.alpha
        out[:, :, self.row:self.row + self.size, self.col:self.col + self.size] = region * (1 - mask) + mask * 1.0
        return out

    def footprint(self, x: torch.Tensor | None = None, tol: float = 1.0 / 255) -> torch.Tensor:
        fp = torch.zeros(self.input_shape[1:], dtype=torch.bool)
        fp[self.row:self.row + self.size, self.col:self.col + self.size] = self.logo > 0
        return fp


@register_trigger
class RecoveredTrigger(Trigger):
    """A trigger reverse-engineered from the model (Neural Cleanse, Wang et al., S&P 2019): ``(1 - m) x + m p``.

    ``mask`` is (H, W) in [0, 1] and ``pattern`` (C, H, W) in [0, 1], stored as nested lists in the spec so a
    suspect card carries it; ``source`` says how it was found (method, anomaly index). It is a *recovered*
    trigger, not the attacker's: views and defenses can use it, and the UI says so.
    """

    name = "recovered"
    recovered = True
    description = "a mask and pattern recovered by trigger reverse-engineering (not the known trigger)"
    defaults = {"mask": None, "pattern": None, "source": {}}

    def _validate(self) -> None:
        c, h, w = self.input_shape
        if self.params["mask"] is None or self.params["pattern"] is None:
            raise ValueError("a recovered trigger needs its mask and pattern")
        self.mask = torch.as_tensor(np.asarray(self.params["mask"], dtype=np.float32))
        self.pattern = torch.as_tensor(np.asarray(self.params["pattern"], dtype=np.float32))
        if tuple(self.mask.shape) != (h, w):
            raise ValueError(f"recovered mask must be {(h, w)}, got {tuple(self.mask.shape)}")
        if tuple(self.pattern.shape) != (c, h, w):
            raise ValueError(f"recovered pattern must be {(c, h, w)}, got {tuple(self.pattern.shape)}")
        if not (torch.isfinite(self.mask).all() and torch.isfinite(self.pattern).all()):
            raise ValueError("recovered mask and pattern must be finite")
        self.mask = self.mask.clamp(0, 1)
        self.pattern = self.pattern.clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(x)
        return (1 - m) * x + m * self.pattern.to(x)

    def footprint(self, x: torch.Tensor | None = None, tol: float = 1.0 / 255) -> torch.Tensor:
        """Pixels holding at least half of the mask's peak value (a soft mask touches every pixel a little)."""
        return self.mask >= 0.5 * float(self.mask.max())

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "mapping": self.mapping,
                "params": {"mask": np.round(self.mask.numpy(), 4).tolist(),
                           "pattern": np.round(self.pattern.numpy(), 4).tolist(),
                           "source": dict(self.params.get("source") or {})}}

    def __repr__(self) -> str:
        return f"RecoveredTrigger(target={self.target}, mask_l1={float(self.mask.sum()):.1f})"
