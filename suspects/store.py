"""Suspect folders: save and load a model under investigation with its card.

A suspect folder holds ``model.safetensors`` and ``suspect.json`` (the card) and, for suspects trained
here, ``poisoned_indices.json``. :func:`load` also takes a bare state dict (``.safetensors``, ``.pt``,
``.pth``) with the architecture named. Loading never executes code from a file (see :mod:`suspects.checkpoint`:
safetensors, or ``torch.load(weights_only=True)`` with an allow-list of numpy types). Other formats plug in
through :func:`register_loader`; BackdoorBench's is registered by name and imported on first use.
"""

from __future__ import annotations

import copy
import datetime as _dt
import importlib
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_folder, save_safetensors, write_json, write_text
from .checkpoint import MAX_CHECKPOINT_BYTES, CheckpointError, SuspectLoadError, load_state_dict_file
from .data import DatasetPair, ImageSet, defense_pool_split, load_dataset
from .models import InspectableModel, create_model, get_skip_gammas, set_skip_gamma
from .poison import PoisonedDataset
from .triggers import PoisonPlan, Trigger, trigger_from_spec

__all__ = [
    "Suspect",
    "SealedSplitError",
    "without_test_split",
    "SuspectLoadError",
    "CheckpointError",
    "load",
    "save",
    "write_suspect_files",
    "load_state_dict_file",
    "MAX_CHECKPOINT_BYTES",
    "register_loader",
    "library_versions",
    "adopt_trigger",
    "DEMO_SUSPECTS",
    "demo_suspect_path",
    "list_demo_suspects",
    "normalization_for",
    "normalization_label",
]

CARD_FILE = "suspect.json"
MODEL_FILE = "model.safetensors"
POISON_FILE = "poisoned_indices.json"
DEMO_SUSPECTS = Path(__file__).resolve().parent.parent / "assets" / "demo" / "suspects"

def library_versions() -> dict[str, str]:
    import numpy
    import torchvision

    import suspects

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "backdoor_lens": getattr(suspects, "__version__", "0")}


@dataclass
class Suspect:
    """A model under investigation with what is needed to measure it.

    ``card`` is the JSON-able metadata (see ``suspect.json``); data, trigger and the poisoned training set
    are derived from it lazily.
    """

    model: nn.Module
    card: dict[str, Any]
    path: Path | None = None
    _plan: PoisonPlan | None = field(default=None, repr=False)
    _trigger_override: Trigger | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.card.get("name") or (self.path.name if self.path else "suspect"))

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.card["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.card["input_shape"])  # type: ignore[return-value]

    @cached_property
    def data(self) -> DatasetPair:
        spec = self.card.get("data")
        if not spec:
            raise SuspectLoadError(f"suspect {self.name!r} names no data source; pass one when loading")
        pair = load_dataset(spec)
        if pair.classes != self.classes and len(pair.classes) != self.num_classes:
            raise SuspectLoadError(f"data source has {len(pair.classes)} classes but the model has {self.num_classes}")
        if tuple(pair.input_shape) != self.input_shape:
            raise SuspectLoadError(f"data source gives images {pair.input_shape} but the model expects {self.input_shape}")
        return pair

    @property
    def test(self) -> ImageSet:
        return self.data.test

    @cached_property
    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.card.get("split", {})
        return defense_pool_split(len(self.data.train), float(s.get("pool_fraction", 0.05)), int(s.get("seed", 0)))

    @property
    def pool_in_training(self) -> bool:
        """Whether the suspect was trained on its defense pool (cards written before the option existed: yes)."""
        return bool((self.card.get("split") or {}).get("pool_in_training", True))

    @property
    def defense_pool(self) -> ImageSet:
        """Clean training images a defense may use (never poisoned, disjoint from the test split)."""
        return self.data.train.subset(self.split[1], "defense-pool")

    @property
    def trigger(self) -> Trigger | None:
        if self._trigger_override is not None:
            return self._trigger_override
        spec = self.card.get("trigger")
        if not spec:
            return None
        return trigger_from_spec(spec, self.input_shape, self.num_classes)

    def poisoned_train(self) -> PoisonedDataset:
        """The poisoned training set, when known (raises otherwise)."""
        trig = self.trigger
        poison = self.card.get("poison") or {}
        if trig is None or not poison:
            raise SuspectLoadError(f"the poisoned training set of {self.name!r} is not known")
        plan = self._plan
        if plan is None and self.path is not None and (self.path / POISON_FILE).is_file():
            raw = json.loads((self.path / POISON_FILE).read_text())
            plan = PoisonPlan(torch.tensor(raw["poison_idx"], dtype=torch.long),
                              torch.tensor(raw.get("noise_idx", []), dtype=torch.long))
        return PoisonedDataset(self.data.train, trig, float(poison.get("rate", 0.0)), int(poison.get("seed", 0)),
                               exclude=self.split[1], plan=plan)


class SealedSplitError(RuntimeError):
    """Raised when code that must not see the test split (a defense) touches it."""


class SealedSplit:
    """Stands in for the test split where it must not be used: any use raises :class:`SealedSplitError`."""

    def __init__(self, why: str) -> None:
        object.__setattr__(self, "_why", why)

    def _refuse(self, *_: object, **__: object):
        raise SealedSplitError(object.__getattribute__(self, "_why"))

    def __getattr__(self, name: str):
        self._refuse()

    __len__ = __iter__ = __getitem__ = _refuse


SEALED_WHY = ("a defense may not read the test split: it works on its clean pool only, and the test split is kept "
              "for measuring it")


def without_test_split(suspect: Suspect, why: str = SEALED_WHY) -> Suspect:
    """A view of ``suspect`` (same model, card, trigger, training data) whose test split is sealed: reading
    ``view.test`` or ``view.data.test`` raises :class:`SealedSplitError`. Defenses get this view, so no preset,
    threshold or stopping rule can be chosen with test-split numbers."""
    view = copy.copy(suspect)
    pair = suspect.data
    view.__dict__["data"] = DatasetPair(pair.train, SealedSplit(why), dict(pair.spec))  # type: ignore[arg-type]
    return view


def adopt_trigger(suspect: Suspect, spec: dict[str, Any], parent: str | None = None) -> Suspect:
    """A copy of ``suspect`` that uses ``spec`` (usually a recovered trigger) as its trigger.

    The known trigger, if any, moves to ``card["true_trigger"]``; the poisoned training set and the stored metrics
    belong to that trigger, so they move to ``true_poison`` / ``true_metrics`` and are not used with the new one.
    """
    trig = trigger_from_spec(spec, suspect.input_shape, suspect.num_classes)  # validates shapes and target
    card = copy.deepcopy(suspect.card)
    old = card.get("trigger")
    if old and old.get("name") != "recovered":
        card["true_trigger"] = old
    for key in ("poison", "metrics"):
        if key in card:
            card[f"true_{key}"] = card.pop(key)
    card["trigger"] = trig.spec()
    base = str(card.get("name") or suspect.name).split(" · recovered")[0]
    card["name"] = f"{base} · recovered trigger (class {trig.target})"
    card["provenance"] = {**(card.get("provenance") or {}), "source": "recovered trigger",
                          "parent": parent or suspect.name, "trigger_source": dict(trig.params.get("source") or {})}
    for key in ("created", "skip_gammas"):
        card.pop(key, None)
    return Suspect(suspect.model, card, None)


# --- checkpoint readers ------------------------------------------------------------------------------


def _unwrap_state_dict(obj: dict[str, Any], name: str = "the checkpoint") -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict", "net"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(name, "not-a-state-dict", f"{name} holds no tensors (expected a model state dict)")
    return sd


def _first_conv_key(model: nn.Module) -> str | None:
    return next((f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _head_key(model: nn.Module) -> str | None:
    if not isinstance(model, InspectableModel):
        return None
    head = model.get_classifier()
    return next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)


def read_arch_from_weights(arch: str, state_dict: dict[str, torch.Tensor],
                           input_shape: tuple[int, int, int] = (3, 32, 32),
                           arch_kwargs: dict[str, Any] | None = None) -> dict[str, int]:
    """``width``, ``in_channels`` and ``num_classes`` of architecture ``arch`` read off a state dict's first
    convolution and classifier (whichever of them it holds), as the BackdoorBench importer does."""
    from .adapters import is_library_arch

    if is_library_arch(arch):
        kw = {k: v for k, v in (arch_kwargs or {}).items() if k not in ("num_classes", "in_channels")}
        kw.setdefault("input_size", int(input_shape[-1]))
        probe = create_model(arch, num_classes=2, in_channels=int(input_shape[0]), **kw)
    else:
        probe = create_model(arch, num_classes=2, in_channels=1)
    out: dict[str, int] = {}
    conv, head = _first_conv_key(probe), _head_key(probe)
    w = state_dict.get(conv) if conv else None
    if w is not None and w.dim() == 4:
        if "width" in _ctor_args(arch):
            out["width"] = int(w.shape[0])
        out["in_channels"] = int(w.shape[1])
    h = state_dict.get(head) if head else None
    if h is not None and h.dim() == 2:
        out["num_classes"] = int(h.shape[0])
    return out


def _ctor_args(arch: str) -> set[str]:
    import inspect

    from .models import _REGISTRY

    try:
        return set(inspect.signature(_REGISTRY[arch]).parameters)
    except (KeyError, TypeError, ValueError):
        return set()


def _mismatch_parts(model: nn.Module, state_dict: dict[str, torch.Tensor], shapes: list[str]) -> list[str]:
    """What differs, in words: class count, input channels, width (named before the raw shapes)."""
    own = model.state_dict()
    parts = []
    head = _head_key(model)
    if head in shapes:
        theirs, ours = tuple(state_dict[head].shape), tuple(own[head].shape)
        if theirs[0] != ours[0]:
            parts.append(f"class count: the checkpoint has {theirs[0]} classes, the model was built for {ours[0]}")
    conv = _first_conv_key(model)
    if conv in shapes:
        theirs, ours = tuple(state_dict[conv].shape), tuple(own[conv].shape)
        if theirs[1] != ours[1]:
            parts.append(f"input channels: the checkpoint takes {theirs[1]}, the model was built for {ours[1]}")
        if theirs[0] != ours[0]:
            parts.append(f"width: the checkpoint's first convolution has {theirs[0]} channels, the model was "
                         f"built with {ours[0]}")
    return parts


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load strictly; a mismatch (:class:`CheckpointError`, kind ``mismatch``) names what differs (class count,
    input channels, width), then the missing, unexpected and mis-shaped keys. ``source`` names the file."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        named = _mismatch_parts(model, state_dict, shapes)
        parts: list[str] = []
        if shapes:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes[:8])
                + (" ..." if len(shapes) > 8 else ""))
        if missing:
            parts.append("missing keys: " + ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected[:8])
                         + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
        arch = getattr(model, "arch_name", type(model).__name__)
        # the summary names what differs (class count, channels, width); the key lists go to the details
        head = "; ".join(named) if named else "; ".join(parts)
        raise CheckpointError(source, "mismatch", f"{source}: wrong architecture / class count for {arch}: {head}",
                              "\n".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)


# --- saving --------------------------------------------------------------------------------------------


def write_suspect_files(suspect: Suspect, folder: str | os.PathLike) -> dict[str, Any]:
    """Write a suspect's files (weights, card, poisoned indices, trigger data) into an existing ``folder``, which the
    caller makes appear atomically (:func:`save`, the run store); returns the card as written."""
    folder = Path(folder)
    card = dict(suspect.card)
    card["skip_gammas"] = get_skip_gammas(suspect.model, non_default_only=True)
    card.setdefault("versions", library_versions())
    card.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    save_safetensors(folder / MODEL_FILE, suspect.model.state_dict(), {"arch": str(card.get("arch", ""))})
    if suspect._plan is not None:
        write_json(folder / POISON_FILE, {"poison_idx": suspect._plan.poison_idx.tolist(),
                                          "noise_idx": suspect._plan.noise_idx.tolist()})
        card.setdefault("poison", {})["indices_file"] = POISON_FILE
    write_files = getattr(suspect._trigger_override, "write_files", None)
    if callable(write_files):  # a trigger with data files (stored poisoned images) keeps them beside the card
        write_files(folder)
    write_text(folder / CARD_FILE, json.dumps(card, indent=2, sort_keys=False))
    return card


def save(suspect: Suspect, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a suspect folder atomically: it appears (or replaces the old one) only once complete."""
    folder = Path(folder)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_suspect_files(suspect, tmp)
    suspect.path = folder
    return folder


# --- loading ---------------------------------------------------------------------------------------------

Loader = Callable[..., "Suspect | None"]
# A loader, or "module:function" naming one that is imported the first time a suspect is loaded (so importing
# suspects does not import every format's module). Tried in order; the first to return a Suspect wins.
_LOADERS: list[Loader | str] = ["suspects.backdoorbench:load_hook"]


def register_loader(fn: Loader | str) -> Loader | str:
    """Add a loader: ``fn(path, **kw)`` returns a Suspect, or None when the path is not its format.

    ``fn`` may be ``"package.module:function"``: the module is imported when a suspect is first loaded.
    """
    if fn not in _LOADERS:
        _LOADERS.insert(0, fn)
    return fn


def _loaders() -> list[Loader]:
    for i, entry in enumerate(_LOADERS):
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            _LOADERS[i] = getattr(importlib.import_module(module), attr)
    return list(_LOADERS)  # type: ignore[arg-type]


def list_demo_suspects() -> list[str]:
    if not DEMO_SUSPECTS.is_dir():
        return []
    return sorted(p.name for p in DEMO_SUSPECTS.iterdir() if (p / CARD_FILE).is_file())


def demo_suspect_path(name: str) -> Path:
    path = DEMO_SUSPECTS / name
    if not (path / CARD_FILE).is_file():
        raise SuspectLoadError(f"no demo suspect {name!r}; available: {', '.join(list_demo_suspects()) or '(none)'}")
    return path


def _read_card(folder: Path) -> dict[str, Any]:
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except json.JSONDecodeError as err:
        raise SuspectLoadError(f"{folder / CARD_FILE} is not valid JSON: {err}") from err
    if not isinstance(card, dict):
        raise SuspectLoadError(f"{folder / CARD_FILE} must hold a JSON object")
    required = ("arch", "classes", "input_shape")
    missing = [k for k in required if k not in card]
    if missing:
        raise SuspectLoadError(f"{folder / CARD_FILE} lacks {', '.join(missing)}")
    return card


def _build_model(card: dict[str, Any]) -> nn.Module:
    from .adapters import is_library_arch

    kwargs = dict(card.get("arch_kwargs", {}))
    kwargs.setdefault("num_classes", len(card["classes"]))
    kwargs.setdefault("in_channels", int(card["input_shape"][0]))
    if is_library_arch(str(card["arch"])):
        kwargs.setdefault("input_size", int(card["input_shape"][-1]))
    norm = card.get("normalization") or {}
    if norm.get("mean") is not None:
        kwargs.setdefault("mean", norm["mean"])
        kwargs.setdefault("std", norm["std"])
    try:
        return create_model(card["arch"], **kwargs)
    except (TypeError, ValueError) as err:
        raise SuspectLoadError(f"cannot build architecture {card['arch']!r} with {kwargs}: {err}") from err


def _load_folder(folder: Path) -> Suspect:
    card = _read_card(folder)
    model = _build_model(card)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise SuspectLoadError(f"{folder} has no {MODEL_FILE}")
    sd = _unwrap_state_dict(load_state_dict_file(weights), str(weights))
    if getattr(model, "sequential_blocks", True) is False:
        from .adapters import to_wrapper_keys

        sd = to_wrapper_keys(sd)
    load_weights(model, sd, str(weights))
    for name, gamma in (card.get("skip_gammas") or {}).items():
        set_skip_gamma(model, name, gamma)
    model.eval()
    return Suspect(model, card, folder)


def load(path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None,
         input_shape: tuple[int, int, int] | None = None, classes: list[str] | None = None,
         data: dict | str | None = None, arch_kwargs: dict | None = None, trigger: dict | None = None,
         name: str | None = None, label: str | None = None, normalize: str | None = None) -> Suspect:
    """Load a suspect.

    ``path`` is a suspect folder, ``demo:NAME`` (a bundled demo suspect), ``zoo:NAME`` (a built suspect of the zoo,
    :mod:`suspects.zoo`) or a bare state dict
    (``.safetensors`` / ``.pt`` / ``.pth``); a bare state dict needs ``arch``; its width, input channels and
    class count are read off the weights unless given (``arch_kwargs``, ``input_shape``, ``num_classes`` /
    ``classes``; height and width of the input default to 32). ``data`` names the data source to
    measure it on; ``trigger`` a trigger spec when the attack is known. ``label`` names a bare state dict in
    error messages (e.g. an upload's own filename rather than its temporary copy; default ``path``).

    ``arch`` is a registered architecture or ``torchvision:NAME`` / ``timm:NAME`` (:mod:`suspects.adapters`; the
    file then holds the library's own key names). The input normalisation of a bare state dict is ``normalize``
    (a name of :data:`suspects.data.NORMALIZATIONS` or ``M1,...,Mc/S1,...,Sc``); without it, the data source's
    standard one is assumed, or none (mean 0, std 1) without a known source, and the card says it was assumed
    (``card["normalization"]["assumed"]``). The input shape defaults to the data source's. A suspect folder keeps
    its card's normalisation (``normalize`` then overrides it, and the card says so).

    Raises :class:`SuspectLoadError`; a bad checkpoint file raises its subclass :class:`CheckpointError`.
    """
    text = str(path)
    if text.startswith("demo:"):
        return _with_normalization(_load_folder(demo_suspect_path(text[5:])), normalize)
    if text.startswith("zoo:"):  # a suspect of the zoo (suspects/zoo.py): its folder, built or the bundle's
        from .zoo import zoo_path

        return _with_normalization(_load_folder(zoo_path(text)), normalize)
    p = Path(text).expanduser()
    for loader in _loaders():
        found = loader(p, arch=arch, num_classes=num_classes, input_shape=input_shape, classes=classes, data=data)
        if found is not None:
            return found
    if p.is_dir():
        if not (p / CARD_FILE).is_file():
            raise SuspectLoadError(f"{p} is a folder without {CARD_FILE}; is it a suspect folder?")
        return _with_normalization(_load_folder(p), normalize)
    shown = label or str(p)
    if not p.exists():
        raise CheckpointError(shown, "missing", f"{shown} does not exist")
    if p.suffix == ".pt2":
        from .exported import load_exported

        return load_exported(p, shown, num_classes=num_classes, input_shape=input_shape, classes=classes, data=data,
                             trigger=trigger, suspect_name=name, normalize=normalize)
    if p.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise SuspectLoadError(f"{shown}: unsupported file type {p.suffix!r} (use .safetensors, .pt, .pth, or .pt2 "
                               "for a torch.export program)")
    # the file's own problems (missing, not a checkpoint, truncated, asks to run code) come before anything else
    sd = _unwrap_state_dict(load_state_dict_file(p, shown), shown)
    if arch is None:
        raise SuspectLoadError(f"{shown} is a bare state dict ({len(sd)} tensors): name its architecture "
                               "(arch=...; CLI --arch, e.g. preact_resnet18, torchvision:resnet18, timm:resnet18)")
    from .adapters import is_library_arch, to_wrapper_keys
    from .data import source_input_shape

    library = is_library_arch(arch)
    if library:
        sd = to_wrapper_keys(sd)
    data_shape = source_input_shape(data)
    try:
        found = read_arch_from_weights(arch, sd, data_shape or (3, 32, 32), arch_kwargs or {})
    except (TypeError, ValueError):  # an unknown architecture: _build_model says so below
        found = {}
    # read off the weights what the caller did not give: width, input channels, class count
    if input_shape:
        shape = tuple(input_shape)
    elif data_shape:
        shape = data_shape
    else:
        shape = (found.get("in_channels", 3), 32, 32)
    if classes is None:
        if num_classes is None:
            num_classes = found.get("num_classes")
        if num_classes is None:
            raise SuspectLoadError("a bare state dict needs num_classes (or the class names)")
        classes = [str(i) for i in range(int(num_classes))]
    elif num_classes is not None and len(classes) != int(num_classes):
        raise SuspectLoadError(f"{len(classes)} class names given but num_classes={num_classes}")
    kwargs = dict(arch_kwargs or {})
    if "width" in found:
        kwargs.setdefault("width", found["width"])
    data_spec = {"name": data} if isinstance(data, str) else data
    card: dict[str, Any] = {
        "name": name or p.stem, "arch": arch, "arch_kwargs": kwargs, "classes": list(classes),
        "input_shape": list(shape), "data": data_spec, "trigger": trigger,
        "normalization": normalization_for(normalize, data_spec, int(shape[0])),
        "provenance": {"source": "state dict", "file": shown},
    }
    model = _build_model(card)
    load_weights(model, sd, shown)
    model.eval()
    return Suspect(model, card, None)


def normalization_for(normalize: str | None, data: dict | str | None, channels: int) -> dict[str, Any]:
    """The card's ``normalization`` of a bare file: the named one, else the data source's standard one, else none;
    ``assumed`` says whether the user named it, ``label`` what it is (shown next to BA)."""
    from .data import NORMALIZATIONS, SOURCE_NORMALIZATION, parse_normalization, source_name

    if normalize:
        mean, std, label = parse_normalization(normalize, channels)
        return {"mean": mean, "std": std, "label": label, "assumed": False}
    src = source_name(data)
    key = SOURCE_NORMALIZATION.get(src or "")
    if key is not None and (len(NORMALIZATIONS[key][0]) in (1, channels)):
        mean, std, _ = parse_normalization(key, channels)
        return {"mean": mean, "std": std, "label": f"{key} (the {src} data source's standard; assumed)",
                "assumed": True}
    mean, std, _ = parse_normalization("none", channels)
    why = f"the {src} data source has no standard one" if src else "no data source named"
    return {"mean": mean, "std": std, "label": f"none (mean 0, std 1; assumed: {why})", "assumed": True}


def _with_normalization(suspect: Suspect, normalize: str | None) -> Suspect:
    """A suspect folder keeps its card's normalisation unless ``normalize`` names another (the card then says so)."""
    if not normalize:
        return suspect
    from .data import parse_normalization

    mean, std, label = parse_normalization(normalize, suspect.input_shape[0])
    card = copy.deepcopy(suspect.card)
    card["normalization"] = {"mean": mean, "std": std, "label": f"{label} (overrides the card's)", "assumed": False}
    model = _build_model(card)
    model.load_state_dict(suspect.model.state_dict())
    for block, gamma in (card.get("skip_gammas") or {}).items():
        set_skip_gamma(model, block, gamma)
    return Suspect(model.eval(), card, suspect.path)


def normalization_label(card: dict[str, Any]) -> str:
    """What normalisation a suspect's model applies, in words (for the line next to BA)."""
    norm = card.get("normalization") or {}
    if norm.get("label"):
        return str(norm["label"])
    if norm.get("mean") is not None:
        fmt = ",".join
        return (f"mean {fmt(f'{v:.4g}' for v in norm['mean'])} / std {fmt(f'{v:.4g}' for v in norm['std'])} "
                "(from the card)")
    return "the architecture's default (the card names none)"
