"""A trigger known only through stored poisoned images, e.g. the PNGs of a BackdoorBench run.

BackdoorBench keeps no parametric trigger, only the poisoned copies of the test images (``bd_test``) and of
the poisoned training images (``bd_train``). :class:`StoredTrigger` maps a clean image to its stored poisoned
copy, looked up by the clean image's exact 8-bit content, so every caller that does ``trigger(x)`` on test
images (the metrics, every view) gets the run's own poisoned images and BA / ASR / RA equal what the run's
files give by hand.

Images with no stored copy (a defense's clean pool) are poisoned with a per-pixel affine fit
``round(clamp(a * x + b))`` of the stored pairs, but only when that fit reproduces held-out stored pairs to
within :data:`FIT_TOLERANCE` grey levels (patch, blend and additive triggers such as BadNets, Blended, SIG);
otherwise they raise :class:`UncoveredImageError`, and :meth:`StoredTrigger.covers` tells callers beforehand.
Such a trigger has no *trigger function* (:data:`TRIGGER_FUNCTION`, :func:`has_trigger_function`): what stamps the
trigger on other images (a defense's clean pool, the stress test's pool) cannot use it;
``analysis.applicability.trigger_function_gaps`` lists what is unavailable or limited then.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .triggers import Trigger, get_trigger_class

__all__ = ["StoredImages", "StoredTrigger", "UncoveredImageError", "image_keys", "fit_affine", "FIT_TOLERANCE",
           "STORED_FILE", "KIND_TEST", "KIND_TRAIN_POISON", "KIND_TRAIN_NOISE", "TRIGGER_FUNCTION",
           "has_trigger_function", "attack_name"]

STORED_FILE = "stored_trigger.npz"
KIND_TEST, KIND_TRAIN_POISON, KIND_TRAIN_NOISE = 0, 1, 2
FIT_TOLERANCE = 1.0  # mean absolute error, in 8-bit grey levels, on held-out stored pairs
FIT_MIN_PAIRS = 8
FIT_MAX_PAIRS = 2048
#: what a view or defense that stamps the trigger on images other than the attack's own needs from the trigger (the
#: vocabulary of ``suspects.models.CAPABILITIES``, for the trigger instead of the model)
TRIGGER_FUNCTION = {"trigger_function": "a trigger function (one that stamps the trigger on any image, not only the "
                                        "attack's stored poisoned copies of its own test and training images)"}


class UncoveredImageError(ValueError):
    """An image has no stored poisoned copy and the stored pairs do not define a trigger for new images."""


def image_keys(pixels: np.ndarray) -> np.ndarray:
    """(N, 16) uint8 content keys (BLAKE2b) of uint8 images (N, C, H, W)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    out = np.empty((len(pixels), 16), dtype=np.uint8)
    for i, img in enumerate(pixels):
        out[i] = np.frombuffer(hashlib.blake2b(img.tobytes(), digest_size=16).digest(), dtype=np.uint8)
    return out


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[0, 1] float images -> uint8 array (exact for images that came from uint8)."""
    return x.detach().float().cpu().mul(255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def _affine(clean: np.ndarray, poisoned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = clean.astype(np.float32) / 255.0
    y = poisoned.astype(np.float32) / 255.0
    mx, my = x.mean(0), y.mean(0)
    vx = ((x - mx) ** 2).mean(0)
    cxy = ((x - mx) * (y - my)).mean(0)
    a = np.where(vx > 1e-6, cxy / np.maximum(vx, 1e-6), 1.0).astype(np.float32)
    return a, (my - a * mx).astype(np.float32)


def _apply_affine(a: np.ndarray, b: np.ndarray, clean: np.ndarray) -> np.ndarray:
    y = np.clip(a * (clean.astype(np.float32) / 255.0) + b, 0.0, 1.0)
    return np.round(y * 255.0).astype(np.uint8)


def fit_affine(clean: np.ndarray, poisoned: np.ndarray,
               tolerance: float = FIT_TOLERANCE) -> tuple[np.ndarray | None, np.ndarray | None, float | None]:
    """Per-pixel ``poisoned ~ a * clean + b`` from uint8 pairs: ``(a, b, error)``, or ``(None, None, error)``
    when the error (mean absolute grey levels on the half of the pairs not used to fit) exceeds ``tolerance``.
    The error is None when there are too few pairs to check the fit.
    """
    n = len(clean)
    if n < FIT_MIN_PAIRS:
        return None, None, None
    if n > FIT_MAX_PAIRS:
        pick = np.sort(np.random.default_rng(0).choice(n, FIT_MAX_PAIRS, replace=False))
        clean, poisoned = clean[pick], poisoned[pick]
    a, b = _affine(clean[0::2], poisoned[0::2])
    err = float(np.abs(_apply_affine(a, b, clean[1::2]).astype(np.int16) - poisoned[1::2].astype(np.int16)).mean())
    if err > tolerance:
        return None, None, err
    a, b = _affine(clean, poisoned)
    return a, b, err


def changed_pixels(clean: np.ndarray, poisoned: np.ndarray, tol: int = 1) -> np.ndarray:
    """(H, W) bool: pixels changed by more than ``tol`` grey levels in at least half of the pairs."""
    if len(clean) == 0:
        return np.zeros(clean.shape[2:], dtype=bool)
    diff = np.abs(clean.astype(np.int16) - poisoned.astype(np.int16)).max(axis=1) > tol
    return diff.mean(axis=0) >= 0.5


@dataclass
class StoredImages:
    """Poisoned copies of known clean images plus what is needed to use them.

    Row ``i`` is the poisoned copy of the clean image whose content key is ``keys[i]``; ``kind`` says whether it
    belongs to the test split (:data:`KIND_TEST`), is a poisoned training image or a noise-mode (WaNet "cross")
    training image that keeps its label; ``index`` is its index in its split, ``label`` its true class and
    ``bd_label`` the label the attack gave it. ``fit_a``/``fit_b`` (C, H, W) are the affine fallback (empty when
    not usable), ``footprint`` (H, W) the pixels the trigger changes, ``train_poison_index`` /
    ``train_noise_index`` the training indices of the two kinds even when their images are not stored.
    """

    keys: np.ndarray
    poisoned: np.ndarray
    kind: np.ndarray
    index: np.ndarray
    label: np.ndarray
    bd_label: np.ndarray
    footprint: np.ndarray
    fit_a: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    fit_b: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    train_poison_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    train_noise_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    FIELDS: ClassVar[tuple[str, ...]] = ("keys", "poisoned", "kind", "index", "label", "bd_label", "footprint",
                                         "fit_a", "fit_b", "train_poison_index", "train_noise_index")

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.keys.shape != (n, 16) or self.poisoned.dtype != np.uint8 or self.poisoned.ndim != 4:
            raise ValueError("stored images need (N, 16) keys and uint8 (N, C, H, W) poisoned images")
        for name in ("poisoned", "kind", "index", "label", "bd_label"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"stored images: {name} has {len(getattr(self, name))} rows, keys {n}")

    @property
    def has_fit(self) -> bool:
        return self.fit_a.size > 0

    def rows(self, kind: int) -> np.ndarray:
        return np.nonzero(self.kind == kind)[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` (no pickles: it loads with ``allow_pickle=False``)."""
        with open(path, "wb") as fh:
            np.savez(fh, **{name: getattr(self, name) for name in self.FIELDS})

    @classmethod
    def load(cls, path: str | os.PathLike) -> StoredImages:
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [f for f in ("keys", "poisoned", "kind", "index", "label", "bd_label", "footprint")
                           if f not in z.files]
                if missing:
                    raise ValueError(f"lacks {', '.join(missing)}")
                return cls(**{f: z[f] for f in cls.FIELDS if f in z.files})
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path} is not a stored-trigger file: {err}") from err


def has_trigger_function(trigger: Trigger | None) -> bool:
    """Whether ``trigger`` stamps the trigger on any image: every registered trigger does; a :class:`StoredTrigger`
    only with its affine fallback (patch, blend and additive triggers), never for a sample-specific one."""
    return trigger is not None and bool(getattr(trigger, "applies_to_new_images", True))


def attack_name(trigger: Trigger | None) -> str | None:
    """The registered attack (``suspects.triggers.list_triggers``) behind ``trigger``: its own name, or for a stored
    trigger the attack of the run it came from under this project's name (``lens_attack``, e.g. BackdoorBench's
    ``bpp`` -> ``bppattack``); None for none, a recovered trigger or an attack with no counterpart here."""
    if trigger is None or getattr(trigger, "recovered", False):
        return None
    if not isinstance(trigger, StoredTrigger):
        return trigger.name or None
    if trigger.params.get("lens_attack"):
        return str(trigger.params["lens_attack"])
    if trigger.params.get("attack"):  # imported before the name was recorded
        from .backdoorbench import lens_attack

        return lens_attack(str(trigger.params["attack"]))
    return None


class StoredTrigger(Trigger):
    """The attack as a table of stored poisoned images (see the module docstring); not a registered attack."""

    name = "stored"
    description = "the attack's own poisoned images, stored (e.g. a BackdoorBench run's PNGs)"

    def __init__(self, input_shape: Sequence[int], num_classes: int, images: StoredImages, target: int = 0,
                 mapping: str = "all-to-one", info: dict[str, Any] | None = None, path: Path | None = None):
        super().__init__(input_shape, num_classes, target=target, mapping=mapping)
        if tuple(images.poisoned.shape[1:]) != self.input_shape:
            raise ValueError(f"stored images are {tuple(images.poisoned.shape[1:])}, the model takes {self.input_shape}")
        self.images = images
        self.path = path
        keys = [k.tobytes() for k in images.keys]
        self._lookup: dict[bytes, int] = {}
        for kind in (KIND_TRAIN_POISON, KIND_TEST):  # a test image wins over an identical training image
            self._lookup.update({keys[i]: int(i) for i in images.rows(kind)})
        self._noise = {keys[i]: int(i) for i in images.rows(KIND_TRAIN_NOISE)}
        self.params = {
            "file": STORED_FILE,
            **(info or {}),
            "n_test": int((images.kind == KIND_TEST).sum()),
            "n_train_poisoned": int((images.kind == KIND_TRAIN_POISON).sum()),
            "n_train_noise": int((images.kind == KIND_TRAIN_NOISE).sum()),
            "fallback": "affine" if images.has_fit else None,
        }
        self._a = torch.from_numpy(images.fit_a) if images.has_fit else None
        self._b = torch.from_numpy(images.fit_b) if images.has_fit else None

    @property
    def applies_to_new_images(self) -> bool:
        """Whether images without a stored copy can be poisoned (the affine fallback): a trigger function."""
        return self._a is not None

    def _rows(self, x: torch.Tensor, table: dict[bytes, int]) -> list[int | None]:
        return [table.get(k.tobytes()) for k in image_keys(to_uint8(x))]

    def covers(self, x: torch.Tensor) -> torch.Tensor:
        """Bool per image of ``x``: whether it can be poisoned (a stored copy, or the affine fallback)."""
        if self._a is not None:
            return torch.ones(len(x), dtype=torch.bool)
        return torch.tensor([r is not None for r in self._rows(x, self._lookup)], dtype=torch.bool)

    def _stored(self, x: torch.Tensor, table: dict[bytes, int], what: str) -> torch.Tensor:
        rows = self._rows(x, table)
        out = torch.empty_like(x)
        known = [i for i, r in enumerate(rows) if r is not None]
        if known:
            px = torch.from_numpy(self.images.poisoned[[rows[i] for i in known]])
            out[known] = px.to(device=x.device, dtype=x.dtype) / 255.0
        unknown = [i for i, r in enumerate(rows) if r is None]
        if unknown:
            if what == "noise" or self._a is None:
                raise UncoveredImageError(
                    f"{len(unknown)} of {len(x)} images have no stored {what} copy, and the stored pairs do not "
                    f"define the trigger for new images (it is not a patch/blend/additive trigger): this attack is "
                    f"known only through the poisoned copies of its own test and training images")
            y = (self._a.to(x) * x[unknown] + self._b.to(x)).clamp(0, 1)
            out[unknown] = torch.round(y * 255.0) / 255.0
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._stored(x, self._lookup, "poisoned")

    def apply_noise(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """The stored noise-mode ("cross") copy of each training image; ``seeds`` are not needed."""
        return self._stored(x, self._noise, "noise")

    def footprint(self, x: torch.Tensor | None = None, tol: float = 1.0 / 255) -> torch.Tensor:
        """Pixels the trigger changes on ``x`` (its poisonable images), else on the stored pairs."""
        if x is not None:
            x = x if x.dim() == 4 else x.unsqueeze(0)
            x = x[self.covers(x)]
            if len(x):
                return ((self(x) - x).abs().amax(dim=1) > tol).any(dim=0)
        return torch.from_numpy(self.images.footprint.astype(bool))

    @property
    def sample_specific(self) -> bool:  # type: ignore[override]
        """Whether the run's attack (:func:`attack_name`) is one whose trigger differs per image (e.g. input-aware)."""
        name = attack_name(self)
        try:
            return bool(name) and get_trigger_class(str(name)).sample_specific
        except ValueError:
            return False

    def footprints(self, x: torch.Tensor, tol: float = 1.0 / 255) -> torch.Tensor:
        """(B, H, W): for a sample-specific attack, the pixels each image's stored poisoned copy changes (an image
        without one gets the stored pairs' footprint); otherwise the shared footprint repeated, as the base class."""
        x = x if x.dim() == 4 else x.unsqueeze(0)
        if not self.sample_specific:
            return super().footprints(x, tol)
        out = self.footprint().unsqueeze(0).repeat(len(x), 1, 1)
        ok = self.covers(x)
        if ok.any():
            xs = x[ok]
            out[ok] = (self(xs) - xs).abs().amax(dim=1) > tol
        return out

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "mapping": self.mapping, "params": dict(self.params)}

    def write_files(self, folder: str | os.PathLike) -> None:
        """Put the stored images next to a suspect's card (a hard link to the file it came from when possible)."""
        dest = Path(folder) / STORED_FILE
        if self.path is not None and self.path.is_file():
            try:
                os.link(self.path, dest)
                return
            except OSError:
                try:
                    shutil.copyfile(self.path, dest)
                    return
                except OSError:
                    pass
        self.images.save(dest)

    @classmethod
    def from_file(cls, path: str | os.PathLike, spec: dict[str, Any], input_shape: Sequence[int],
                  num_classes: int) -> StoredTrigger:
        """Rebuild from a suspect folder's stored-images file and the card's trigger spec."""
        path = Path(path)
        info = {k: v for k, v in (spec.get("params") or {}).items()
                if k not in ("file", "n_test", "n_train_poisoned", "n_train_noise", "fallback")}
        return cls(input_shape, num_classes, StoredImages.load(path), target=int(spec.get("target", 0)),
                   mapping=spec.get("mapping", "all-to-one"), info=info, path=path)

    def __repr__(self) -> str:
        p = self.params
        return (f"StoredTrigger(target={self.target}, mapping={self.mapping!r}, test={p['n_test']}, "
                f"train={p['n_train_poisoned']}+{p['n_train_noise']} noise, fallback={p['fallback']})")
