"""BackdoorBench interoperability: open attack runs and defense results as suspects, export repaired suspects.

Only BackdoorBench's *file format* is read and written (dictionary keys, state-dict key names, folder layout,
normalisation constants); none of its code is used. A run folder ``record/<run>/`` holds ``attack_result.pt``
(model state dict, dataset name, the poisoned test and training sets as PNG paths with their labels), the PNGs
under ``bd_test_dataset/`` and ``bd_train_dataset/``, and ``defense/<method>/defense_result.pt`` per defense.

Opening a run (``suspects.load(RUN_DIR, data=DATA_ROOT)`` or :func:`import_run`) gives a suspect whose

- model is the run's network mapped onto this project's architectures (``preactresnet18`` ->
  ``preact_resnet18``, ``resnet18`` -> ``resnet18_torchvision``; width and input channels read off the weights), or
  for the rest of BackdoorBench's zoo (``vgg19_bn``, ``mobilenet_v3_large``, ``efficientnet_b3``, ``densenet161``,
  ``convnext_tiny``, ``vit_b_16`` behind its resize to 224, ...) onto the same torchvision constructor
  (:mod:`suspects.adapters`);
- clean data is the run's dataset (``cifar10`` or ``mnist``, torchvision's order) found under the data root, as
  torchvision's files or as an image-folder copy whose files are named by their index (``train/<class>/<index>.png``);
  either way its order is checked against the run's own poisoned test images;
- trigger is a :class:`~suspects.stored_trigger.StoredTrigger` holding the run's poisoned test PNGs (and the
  poisoned training PNGs), so BA / ASR / RA are those of the run's own images, whatever the attack: the run's
  ``info.pickle`` names it (BackdoorBench's ``inputaware``, ``bpp``, ``trojannn``, ``wanet``, ...), mapped onto this
  project's attacks by :data:`ATTACK_NAMES` (``lens_attack`` on the card); a sample-specific trigger (input-aware,
  WaNet, BppAttack) cannot be re-created from the run's files (no generator, no optimised patch), so the stored
  trigger has no *trigger function* for new images;
- poisoned training indices come from ``bd_train``; WaNet-style noise ("cross") samples, which keep their true
  label, are kept apart and not counted as poisoned.

Files are read by :func:`suspects.checkpoint.load_checkpoint`: ``torch.load(weights_only=True)`` and an allow-list
of the numpy types they contain (``numpy.core.*`` names of files written with numpy 1.x included); anything else
is refused unexecuted. ``suspects.load`` reaches this module through :func:`load_hook`, registered by name in
:mod:`suspects.store` and imported the first time a suspect is loaded.
"""

from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from . import tv_resnet  # noqa: F401  (registers resnet18_torchvision)
from .atomic import replacing
from .checkpoint import CheckpointError, load_checkpoint
from .data import DatasetChecksumError, DatasetNotFoundError, DatasetPair, load_dataset
from .models import create_model, get_skip_gammas
from .store import CARD_FILE, Suspect, SuspectLoadError, _load_folder, load_weights
from .stored_trigger import (
    KIND_TEST,
    KIND_TRAIN_NOISE,
    KIND_TRAIN_POISON,
    STORED_FILE,
    StoredImages,
    StoredTrigger,
    changed_pixels,
    fit_affine,
    image_keys,
)
from .triggers import PoisonPlan

__all__ = ["import_run", "export_backdoorbench", "export_notes", "find_run", "load_hook", "lens_attack", "MODEL_NAMES",
           "DATASETS", "ATTACK_NAMES"]

ATTACK_FILE = "attack_result.pt"
DEFENSE_FILE = "defense_result.pt"
ATTACK_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
# BackdoorBench model_name -> this project's architecture
MODEL_NAMES = {"preactresnet18": "preact_resnet18", "resnet18": "resnet18_torchvision"}
# BackdoorBench model_name -> a torchvision constructor (its zoo builds these from torchvision); the ViT sees its
# images through a resize to 224 (BackdoorBench wraps it as Sequential(Resize, net), hence a leading '1.' in its keys)
TORCHVISION_MODELS = {name: f"torchvision:{name}" for name in (
    "vgg19_bn", "vgg19", "vgg16", "vgg11_bn", "mobilenet_v3_large", "mobilenet_v2", "efficientnet_b0", "efficientnet_b3",
    "densenet121", "densenet161", "convnext_tiny", "vit_b_16", "resnet34", "resnet50", "squeezenet1_0",
    "shufflenet_v2_x1_0", "googlenet", "mnasnet1_0", "resnext50_32x4d", "wide_resnet50_2", "alexnet")}
RESIZED_MODELS = {"vit_b_16": 224}
# BackdoorBench clean_data -> data source, (C, H, W), normalisation (BackdoorBench's own constants)
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {"source": "cifar10", "shape": (3, 32, 32), "mean": [0.4914, 0.4822, 0.4465],
                "std": [0.247, 0.243, 0.261], "probe": ("cifar-10-batches-py",)},
    "mnist": {"source": "mnist", "shape": (1, 28, 28), "mean": [0.5], "std": [0.5],
              "probe": ("MNIST/raw", "train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")},
}
# the attack's name in info.pickle (BackdoorBench's attack/<name>.py; backdoor-toolbox's poison_type for runs saved in
# this layout) -> the registered attack of this project it is; matched case-insensitively. The suspect's trigger stays
# the run's stored poisoned images whatever the name (the generator of input-aware, TrojanNN's optimised patch, ...
# are not in the run's files); the name says which attack they come from (views, Neural Cleanse's scope note).
ATTACK_NAMES = {
    "badnet": "badnets", "badnets": "badnets", "badnet_all_to_all": "badnets", "blended": "blended", "blend": "blended",
    "sig": "sig", "wanet": "wanet", "inputaware": "inputaware", "input_aware": "inputaware", "dynamic": "inputaware",
    "bpp": "bppattack", "bppattack": "bppattack", "trojannn": "trojannn", "adaptive_blend": "adaptive_blend",
    "adaptive_patch": "adaptive_patch",
}
# attacks whose bd_train also stores label-keeping samples with poison_indicator 1 (format reference, section 7):
# WaNet's and input-aware's noise / cross samples, BppAttack's negatives, the adaptive attacks' cover samples
NOISE_ATTACKS = {"wanet", "inputaware", "bppattack", "adaptive_blend", "adaptive_patch"}


def lens_attack(name: str | None) -> str | None:
    """This project's registered attack for a run's attack name (``inputaware``, ``bpp``, ``trojannn``, ...), or None
    when it has no counterpart here (``lc``, ``ssba``, ``lf``, ...)."""
    return ATTACK_NAMES.get(str(name or "").strip().lower()) or None


# --- reading files safely --------------------------------------------------------------------------


def _read(path: Path) -> Any:
    """:func:`~suspects.checkpoint.load_checkpoint`, with a hint for runs that pickle their images as PIL objects."""
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        if err.kind == "refused" and (err.refused_global or "").startswith("PIL."):
            raise CheckpointError(
                err.file, "refused", f"{path} keeps its poisoned images inside the file as pickled PIL images; only "
                f"runs whose images are PNG files (BackdoorBench's default) can be opened ({err.refused_global})",
                err.details, err.refused_global) from None
        raise


# --- locating a run ------------------------------------------------------------------------------------


def find_run(path: str | os.PathLike) -> tuple[Path, Path | None] | None:
    """``(run folder, defense folder or None)`` for a run folder, a defense folder or one of their ``.pt``
    files; None when ``path`` is none of these."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in (ATTACK_FILE, DEFENSE_FILE):
        p = p.parent
    if not p.is_dir():
        return None
    if (p / ATTACK_FILE).is_file():
        return p, None
    if (p / DEFENSE_FILE).is_file():
        run = p.parent.parent
        if p.parent.name != "defense" or not (run / ATTACK_FILE).is_file():
            raise SuspectLoadError(
                f"{p / DEFENSE_FILE} is a BackdoorBench defense result, but its attack run is not at {run}: the "
                f"poisoned data comes from the run's {ATTACK_FILE}, so keep it in <run>/defense/<method>/")
        return run, p
    return None


def _is_image_folder_copy(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _dataset_root(clean_data: str, run_dir: Path, data_root: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    """The folder with the run's clean data and the :func:`~suspects.data.load_dataset` spec that reads it: torchvision's
    layout, or an image-folder copy (``train/<class>/<index>.png``, ``test/<class>/<index>.png``, files named by
    their index in torchvision's order)."""
    info = DATASETS[clean_data]
    if data_root is not None:
        base = Path(data_root).expanduser()
        candidates = [base, base / clean_data]
    else:
        bb = run_dir.resolve().parent.parent  # BackdoorBench's working folder (record/<run>)
        candidates = [bb / "data" / clean_data, bb / "data", Path("~/.cache/backdoor-lens").expanduser()]
    for c in candidates:
        if any((c / probe).exists() for probe in info["probe"]):
            return c.resolve(), {"name": info["source"], "root": str(c.resolve())}
    for c in candidates:
        if _is_image_folder_copy(c):
            return c.resolve(), {"name": "imagefolder", "root": str(c.resolve()), "order": "index"}
    looked = ", ".join(str(c) for c in candidates)
    raise SuspectLoadError(
        f"missing dataset root: the run was trained on {clean_data}, whose clean train and test splits were not found "
        f"in {looked}: neither torchvision's layout ({info['probe'][0]}/) nor an image-folder copy (train/<class>/"
        f"<index>.png and test/<class>/<index>.png, each file named by its index in torchvision's order). Pass the "
        f"folder with --data-root (library: data=...)")


def _check_alignment(clean: np.ndarray, poisoned: np.ndarray, labels: np.ndarray, root: Path, clean_data: str,
                     limit: int = 500) -> None:
    """Refuse clean data whose order differs from the run's: each of the run's poisoned test images must be closer
    to the clean image at its own index than to another clean image of the same class (a fixed rotation within
    each class), for at least 90% of up to ``limit`` of them. Same-class swaps pass the label check; this does not."""
    n = min(len(clean), limit)
    own = np.abs(clean[:n].astype(np.int16) - poisoned[:n].astype(np.int16)).reshape(n, -1).mean(1)
    other_idx = np.arange(n)
    for c in np.unique(labels[:n]):
        members = np.nonzero(labels[:n] == c)[0]
        if len(members) > 1:
            other_idx[members] = np.roll(members, 1)
    comparable = other_idx != np.arange(n)
    if not comparable.any():
        return
    other = np.abs(clean[other_idx].astype(np.int16) - poisoned[:n].astype(np.int16)).reshape(n, -1).mean(1)
    share = float((own[comparable] < other[comparable]).mean())
    if share < 0.9:
        raise SuspectLoadError(
            f"dataset order mismatch: the clean images in {root} are not in the run's order: only {100 * share:.0f}% "
            f"of {int(comparable.sum())} poisoned test images of the run are closer to the clean image at their own "
            f"index than to another image of the same class (the labels agree, so images were swapped within a "
            f"class). The data root must hold {clean_data} in torchvision's order; an image-folder copy is matched by "
            f"its file names, which must be the images' indices")


def _read_csv_metrics(folder: Path, pattern: str) -> dict[str, float]:
    """The last row's test_acc / test_asr / test_ra of a BackdoorBench metrics CSV, when there is one."""
    for f in sorted(folder.glob(pattern)):
        if f.name.endswith("_summary.csv"):
            continue
        try:
            with open(f, newline="") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
        if rows:
            out = {}
            for key, name in (("test_acc", "ba"), ("test_asr", "asr"), ("test_ra", "ra")):
                try:
                    out[name] = float(rows[-1][key])
                except (KeyError, TypeError, ValueError):
                    pass
            if out:
                return {**out, "file": f.name}  # type: ignore[dict-item]
    return {}


# --- state dicts ----------------------------------------------------------------------------------------


def _clean_state_dict(raw: Any, model_name: str, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Undo DataParallel / DBD / Fine-Pruning wrappers and rename torchvision keys; returns the notes too."""
    if not isinstance(raw, dict) or not raw:
        raise SuspectLoadError(f"{source}: 'model' is not a state dict")
    notes: list[str] = []
    sd = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        notes.append("stripped the DataParallel prefix 'module.'")
    if any(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
        notes.append("stripped DBD's 'backbone.' prefix")
    for key in [k for k in sd if k.endswith(".weight_orig")]:
        stem = key[: -len("_orig")]
        mask = sd.pop(stem + "_mask", None)
        if mask is None:
            raise SuspectLoadError(f"{source}: {key} without its {stem}_mask (a pruning reparametrisation)")
        sd[stem] = sd.pop(key) * mask
        notes.append(f"folded the pruning mask into {stem} = {stem}_orig * {stem}_mask")
    if model_name == "resnet18":
        sd = {tv_resnet.project_key(k): v for k, v in sd.items()}
        notes.append("renamed torchvision keys: downsample -> shortcut, fc -> linear")
    elif model_name in TORCHVISION_MODELS:
        if sd and all(k.startswith("1.") for k in sd):
            sd = {k[2:]: v for k, v in sd.items()}
            notes.append("stripped the '1.' prefix of BackdoorBench's Sequential(Resize, net) wrapper")
        notes.append(f"built as {TORCHVISION_MODELS[model_name]} (torchvision's key names, under 'net.')")
    return sd, notes


def _build_torchvision(model_name: str, sd: dict[str, torch.Tensor], num_classes: int, shape: tuple[int, int, int],
                       norm: dict[str, Any], source: str) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """A BackdoorBench network that its zoo builds from torchvision, with torchvision's key names."""
    from .adapters import to_wrapper_keys

    arch = TORCHVISION_MODELS[model_name]
    kwargs: dict[str, Any] = {"input_size": int(shape[-1])}
    if model_name in RESIZED_MODELS:
        kwargs["resize_to"] = RESIZED_MODELS[model_name]
    try:
        model = create_model(arch, num_classes=num_classes, in_channels=shape[0], mean=norm["mean"], std=norm["std"],
                             **kwargs)
    except ValueError as err:
        raise SuspectLoadError(f"{source}: cannot build {arch}: {err}") from None
    load_weights(model, to_wrapper_keys(sd), source)
    return model.eval(), arch, kwargs


def _build(model_name: str, sd: dict[str, torch.Tensor], num_classes: int, shape: tuple[int, int, int],
           norm: dict[str, Any], source: str) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    if model_name in TORCHVISION_MODELS:
        return _build_torchvision(model_name, sd, num_classes, shape, norm, source)
    if model_name not in MODEL_NAMES:
        raise SuspectLoadError(
            f"{source}: unsupported architecture {model_name!r}; Backdoor Lens maps "
            f"{', '.join(sorted(MODEL_NAMES))} onto its own networks and "
            f"{', '.join(sorted(TORCHVISION_MODELS))} onto torchvision's")
    arch = MODEL_NAMES[model_name]
    conv1, head = sd.get("conv1.weight"), sd.get("linear.weight")
    if conv1 is None or conv1.dim() != 4 or head is None or head.dim() != 2:
        raise SuspectLoadError(f"{source}: not a {model_name} state dict (no conv1.weight / classifier weight); "
                               f"keys start with {', '.join(list(sd)[:5])}")
    if head.shape[0] != num_classes:
        raise SuspectLoadError(f"{source}: wrong class count: the classifier has {head.shape[0]} outputs but the run "
                               f"says num_classes={num_classes}")
    if conv1.shape[1] != shape[0]:
        raise SuspectLoadError(f"{source}: the first convolution takes {conv1.shape[1]} channels, the dataset has "
                               f"{shape[0]}")
    kwargs = {"width": int(conv1.shape[0])}
    model = create_model(arch, num_classes=num_classes, in_channels=shape[0], mean=norm["mean"], std=norm["std"],
                         **kwargs)
    load_weights(model, sd, source)
    return model.eval(), arch, kwargs


# --- poisoned samples ------------------------------------------------------------------------------------


def _png_path(run_dir: Path, stored: str) -> Path:
    """A stored PNG path (relative to BackdoorBench's working folder) re-rooted in ``run_dir``, never outside it."""
    parts = PurePosixPath(str(stored).replace("\\", "/")).parts
    if "record" in parts:
        at = len(parts) - 1 - parts[::-1].index("record")
        rel = parts[at + 2:]
    else:
        rel = parts[-3:]
    if not rel or any(p in ("..", "/", "") for p in rel):
        raise SuspectLoadError(f"{run_dir}: unusable image path {stored!r} in {ATTACK_FILE}")
    path = run_dir.joinpath(*rel)
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise SuspectLoadError(f"{run_dir}: image path {stored!r} points outside the run folder")
    return path


def _entries(state: Any, split: str, n: int,
             required: bool = True) -> tuple[np.ndarray, dict[int, tuple[str, int, int]]]:
    """Indicator-1 indices of a dataset state, and index -> (stored path, bd_label, original label); without
    ``required``, a state with an indicator but no ``data_dict`` gives the indices and no entries."""
    if not isinstance(state, dict):
        raise SuspectLoadError(f"{ATTACK_FILE}: {split} is not a dataset state")
    indicator = state.get("poison_indicator")
    container = state.get("bd_data_container")
    data_dict = container.get("data_dict") if isinstance(container, dict) else None
    if not isinstance(data_dict, dict):
        if required or indicator is None:
            raise SuspectLoadError(f"{ATTACK_FILE}: {split} lacks bd_data_container.data_dict")
        data_dict = {}
    if indicator is None:
        idx = np.array(sorted(int(k) for k in data_dict), dtype=np.int64)
    else:
        indicator = np.asarray(indicator)
        if len(indicator) != n:
            raise SuspectLoadError(f"{ATTACK_FILE}: {split}.poison_indicator has {len(indicator)} entries but the "
                                   f"dataset's split has {n} images: is the data root the run's dataset?")
        idx = np.nonzero(indicator == 1)[0].astype(np.int64)
    out: dict[int, tuple[str, int, int]] = {}
    for key, entry in data_dict.items():
        if isinstance(entry, dict) and "path" in entry and len(entry.get("other_info") or []) >= 2:
            info = entry["other_info"]
            out[int(key)] = (str(entry["path"]), int(info[0]), int(info[1]))
        else:
            raise SuspectLoadError(f"{ATTACK_FILE}: {split} entry {int(key)} is not a PNG path with "
                                   f"[bd_label, original_label] (only PNG-backed runs can be opened)")
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise SuspectLoadError(f"{ATTACK_FILE}: {split} names image {int(idx.max())}, but the dataset's split has {n} "
                               f"images: is the data root the run's dataset?")
    lost = [int(i) for i in idx if int(i) not in out]
    if lost and (required or out):
        raise SuspectLoadError(f"{ATTACK_FILE}: {len(lost)} poisoned {split} indices have no data_dict entry "
                               f"(first: {lost[:5]})")
    return idx, out


def _read_pngs(run_dir: Path, paths: list[str], shape: tuple[int, int, int], split: str) -> np.ndarray:
    from PIL import Image

    files = [_png_path(run_dir, p) for p in paths]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SuspectLoadError(
            f"missing files: {len(missing)} of the {len(files)} poisoned {split} PNGs are not in the run folder "
            f"(first: {missing[0]}); copied or zipped runs often lack bd_*_dataset/")
    c, h, w = shape
    out = np.empty((len(files), c, h, w), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                if im.size != (w, h):
                    raise SuspectLoadError(f"{f} is {im.size[0]}x{im.size[1]}, the run's images are {w}x{h}")
                arr = np.asarray(im.convert("L" if c == 1 else "RGB"))
        except OSError as err:
            raise SuspectLoadError(f"{f} is not a readable image: {err}") from err
        out[i] = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return out


def _mapping(bd: np.ndarray, orig: np.ndarray, k: int, declared: str | None) -> tuple[str, int]:
    """All-to-one (target) or all-to-all, read off the poisoned test labels."""
    one = len(bd) > 0 and bool((bd == bd[0]).all()) and bool((orig != bd[0]).all())
    everyone = bool((bd == (orig + 1) % k).all())
    if one and not (everyone and declared == "all2all"):
        return "all-to-one", int(bd[0])
    if everyone:
        return "all-to-all", 0
    raise SuspectLoadError(f"{ATTACK_FILE}: the poisoned test labels follow neither all-to-one (one target) nor "
                           f"all-to-all ((y + 1) mod {k})")


def _training_poison(state: Any, run_dir: Path, pair: DatasetPair, root: Path, shape: tuple[int, int, int],
                     target: int, mapping: str, attack_name: str | None) -> tuple[np.ndarray, np.ndarray | None,
                                                                                 np.ndarray, np.ndarray,
                                                                                 np.ndarray | None, list[str]]:
    """Poisoned training indices, their bd / true labels, which are noise samples, their PNGs (or None), notes."""
    notes: list[str] = []
    k = len(pair.classes)
    tr_idx = np.zeros(0, dtype=np.int64)
    tr_entries: dict[int, tuple[str, int, int]] = {}
    if state is not None:
        tr_idx, tr_entries = _entries(state, "bd_train", len(pair.train), required=False)
        if len(tr_idx) and not tr_entries:
            notes.append("bd_train has no data_dict: poisoned training indices only, no labels or images")
    elif (run_dir / "train_poison_index_list.pickle").is_file():
        ind = np.asarray(_read(run_dir / "train_poison_index_list.pickle")).reshape(-1)
        if len(ind) != len(pair.train):
            raise SuspectLoadError(f"train_poison_index_list.pickle has {len(ind)} entries but the training split "
                                   f"has {len(pair.train)} images: is the data root the run's dataset?")
        tr_idx = np.nonzero(ind == 1)[0].astype(np.int64)
        notes.append("bd_train is absent: poisoned training indices from train_poison_index_list.pickle, no images")
    tr_bd = np.array([tr_entries[int(i)][1] for i in tr_idx], dtype=np.int64) if tr_entries else None
    tr_orig = pair.train.labels.numpy()[tr_idx]
    if tr_entries:
        rec_orig = np.array([tr_entries[int(i)][2] for i in tr_idx], dtype=np.int64)
        if (rec_orig != tr_orig).any():
            raise SuspectLoadError(f"dataset order mismatch: poisoned training images have other true labels in the "
                                   f"run than in {root}")
    # noise ("cross") samples keep their label; one of a non-target class (or any, all-to-all) can be nothing else
    kept = np.ones(len(tr_idx), dtype=bool) if tr_bd is None else tr_bd == tr_orig
    sure_noise = kept & ((tr_orig != target) | (mapping == "all-to-all"))
    noise_mode = lens_attack(attack_name) in NOISE_ATTACKS or (run_dir / "cross_test_dataset").is_dir() \
        or (tr_bd is not None and bool(sure_noise.any()))
    if tr_bd is None or not noise_mode:
        is_noise = np.zeros(len(tr_idx), dtype=bool)
    else:
        is_noise = kept
        notes.append("noise-mode attack: training samples that keep their true label are noise ('cross', or "
                     "BppAttack's negative) samples, not poisoned; triggered samples of the target class cannot be "
                     "told apart and count as noise")
    want = np.full_like(tr_orig, target) if mapping == "all-to-one" else (tr_orig + 1) % k
    if tr_bd is not None and (tr_bd[~is_noise] != want[~is_noise]).any():
        raise SuspectLoadError(f"{ATTACK_FILE}: bd_train labels do not follow the {mapping} rule of bd_test")
    tr_px = None
    if tr_entries and len(tr_idx):
        try:
            tr_px = _read_pngs(run_dir, [tr_entries[int(i)][0] for i in tr_idx], shape, "training")
        except SuspectLoadError as err:
            notes.append(f"the poisoned training set is not available: {err}")
    return tr_idx, tr_bd, tr_orig, is_noise, tr_px, notes


# --- import ---------------------------------------------------------------------------------------------------


def _lacks(tr_idx: np.ndarray, tr_px: np.ndarray | None, affine: bool, fit_err: float | None, has_info: bool,
           has_reported: bool, is_defense: bool) -> list[str]:
    """What the run does not provide, and what is unavailable because of it (the import summary lists these)."""
    out = []
    if tr_px is None:
        what = ("no poisoned training images (bd_train has indices only, or its PNGs are missing)" if len(tr_idx)
                else "no poisoned training set (bd_train records no poisoned samples)")
        out.append(f"{what}: training-time defenses (those that need the poisoned training set, such as DBD) and "
                   f"the poisoned training points of the feature view are unavailable")
    if not affine:
        why = "sample-specific" if fit_err is not None else "too few to fit"
        out.append(f"no trigger function (the run's poisoned images are {why}: no fixed patch or blend reproduces "
                   f"them, and the run's files hold no generator or optimised trigger): only the run's own stored "
                   f"poisoned copies are triggered, so what stamps the trigger on other images is unavailable or "
                   f"limited (the import summary lists it)")
    if not has_info:
        out.append("no info.pickle: the attack's name and settings are unknown")
    if not has_reported:
        out.append(f"no {'defense metrics CSV' if is_defense else 'attack_df.csv'}: the run's own BA / ASR / RA "
                   f"are not shown beside the measured ones")
    return out


def import_run(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
               name: str | None = None) -> Suspect:
    """Open a BackdoorBench attack run (or a defense result inside one) as a suspect; see the module docstring."""
    found = find_run(path)
    if found is None:
        raise SuspectLoadError(f"{path} is not a BackdoorBench run folder (no {ATTACK_FILE}) nor a defense "
                               f"folder (no {DEFENSE_FILE})")
    run_dir, defense_dir = found
    attack = _read(run_dir / ATTACK_FILE)
    if not isinstance(attack, dict):
        raise SuspectLoadError(f"{run_dir / ATTACK_FILE} holds a {type(attack).__name__}, not BackdoorBench's dict")
    lacking = [k for k in ATTACK_KEYS if k not in attack]
    if lacking:
        raise SuspectLoadError(f"{run_dir / ATTACK_FILE} is not a BackdoorBench attack result: lacks {', '.join(lacking)}")
    info: dict[str, Any] = {}
    if (run_dir / "info.pickle").is_file():
        try:
            loaded = _read(run_dir / "info.pickle")
        except SuspectLoadError as err:
            raise SuspectLoadError(f"{err} info.pickle only holds the attack's settings: move it out of the run "
                                   f"folder to import the run without them") from err
        info = loaded if isinstance(loaded, dict) else {}
    clean_data = str(attack["clean_data"])
    if clean_data not in DATASETS:
        raise SuspectLoadError(f"the run's dataset {clean_data!r} is not supported (supported: "
                               f"{', '.join(DATASETS)}); its clean images could not be found in BackdoorBench's order")
    ds = DATASETS[clean_data]
    try:
        h, w, c = (int(v) for v in attack["img_size"])
    except (TypeError, ValueError) as err:
        raise SuspectLoadError(f"{ATTACK_FILE}: img_size {attack['img_size']!r} is not (H, W, C)") from err
    shape = (c, h, w)
    if shape != tuple(ds["shape"]):
        raise SuspectLoadError(f"{ATTACK_FILE}: img_size {(h, w, c)} does not match {clean_data} {ds['shape']}")
    root, data_spec = _dataset_root(clean_data, run_dir, data_root)
    try:
        pair: DatasetPair = load_dataset(data_spec)
    except DatasetChecksumError as err:
        raise SuspectLoadError(f"{err}: name the copy's folder with --data-root (library: data=...)") from err
    except DatasetNotFoundError as err:
        raise SuspectLoadError(f"missing dataset root: {err}") from err
    if pair.input_shape != shape:
        raise SuspectLoadError(f"the clean images in {root} are {pair.input_shape}, the run's are {shape}")
    k = len(pair.classes)

    # the model: the attack's, or the defense's repaired one
    weights_file = run_dir / ATTACK_FILE
    model_name, num_classes, raw_sd = attack["model_name"], attack["num_classes"], attack["model"]
    if defense_dir is not None:
        weights_file = defense_dir / DEFENSE_FILE
        result = _read(weights_file)
        if not isinstance(result, dict) or not {"model_name", "num_classes", "model"} <= set(result):
            raise SuspectLoadError(f"{weights_file} is not a BackdoorBench defense result "
                                   f"(needs model_name, num_classes, model)")
        if "index" in result:
            raise SuspectLoadError(f"{weights_file} is an older Fine-Pruning result with a physically pruned network "
                                   f"(extra 'index' key, fewer channels); it cannot be mapped onto "
                                   f"{result['model_name']}")
        model_name, num_classes, raw_sd = result["model_name"], result["num_classes"], result["model"]
    try:
        num_classes = int(num_classes)
    except (TypeError, ValueError) as err:
        raise SuspectLoadError(f"{weights_file}: num_classes {num_classes!r} is not a number") from err
    if num_classes != k:
        raise SuspectLoadError(f"{weights_file}: wrong class count: num_classes={num_classes}, but {clean_data} has "
                               f"{k} classes")
    sd, key_notes = _clean_state_dict(raw_sd, str(model_name), str(weights_file))
    model, arch, arch_kwargs = _build(str(model_name), sd, num_classes, shape, ds, str(weights_file))

    # the poisoned test images
    test_idx, test_entries = _entries(attack["bd_test"], "bd_test", len(pair.test))
    t_bd = np.array([test_entries[int(i)][1] for i in test_idx], dtype=np.int64)
    t_orig = np.array([test_entries[int(i)][2] for i in test_idx], dtype=np.int64)
    if len(test_idx) == 0:
        raise SuspectLoadError(f"{ATTACK_FILE}: bd_test holds no poisoned test images")
    true = pair.test.labels.numpy()
    wrong = np.nonzero(true[test_idx] != t_orig)[0]
    if len(wrong):
        raise SuspectLoadError(
            f"dataset order mismatch: {len(wrong)} poisoned test images have another true label in the run than in "
            f"{root} (first: index {int(test_idx[wrong[0]])}); the data root must hold {clean_data} in torchvision's order")
    declared = str(info.get("attack_label_trans", "")) or None
    mapping, target = _mapping(t_bd, t_orig, k, declared)
    required = np.nonzero(true != target)[0] if mapping == "all-to-one" else np.arange(len(true))
    lacking_idx = np.setdiff1d(required, test_idx)
    if len(lacking_idx):
        raise SuspectLoadError(f"{ATTACK_FILE}: bd_test covers {len(required) - len(lacking_idx)} of the "
                               f"{len(required)} test images the attack should poison (first missing index: "
                               f"{int(lacking_idx[0])})")
    t_px = _read_pngs(run_dir, [test_entries[int(i)][0] for i in test_idx], shape, "test")
    _check_alignment(pair.test.pixels.numpy()[test_idx], t_px, t_orig, root, clean_data)

    # the poisoned training set: indices always (when recorded), images when the PNGs are there
    attack_name = str(info.get("attack") or "") or None
    train = _training_poison(attack["bd_train"], run_dir, pair, root, shape, target, mapping, attack_name)
    tr_idx, tr_bd, tr_orig, is_noise, tr_px, notes = train
    poison_idx, noise_idx = tr_idx[~is_noise], tr_idx[is_noise]

    # the stored trigger
    clean_test = pair.test.pixels.numpy()[test_idx]
    fit_a, fit_b, fit_err = fit_affine(clean_test, t_px)
    rows_px, rows_kind, rows_idx, rows_lab, rows_bd, rows_clean = [t_px], [np.full(len(test_idx), KIND_TEST)], \
        [test_idx], [t_orig], [t_bd], [clean_test]
    if tr_px is not None and tr_bd is not None:
        rows_px.append(tr_px)
        rows_kind.append(np.where(is_noise, KIND_TRAIN_NOISE, KIND_TRAIN_POISON))
        rows_idx.append(tr_idx)
        rows_lab.append(tr_orig)
        rows_bd.append(tr_bd)
        rows_clean.append(pair.train.pixels.numpy()[tr_idx])
    images = StoredImages(
        keys=image_keys(np.concatenate(rows_clean)), poisoned=np.concatenate(rows_px),
        kind=np.concatenate(rows_kind).astype(np.int8), index=np.concatenate(rows_idx).astype(np.int64),
        label=np.concatenate(rows_lab).astype(np.int64), bd_label=np.concatenate(rows_bd).astype(np.int64),
        footprint=changed_pixels(clean_test, t_px),
        fit_a=fit_a if fit_a is not None else np.zeros(0, np.float32),
        fit_b=fit_b if fit_b is not None else np.zeros(0, np.float32),
        train_poison_index=poison_idx.astype(np.int64), train_noise_index=noise_idx.astype(np.int64))
    known_as = lens_attack(attack_name)
    trig_info = {"source": "BackdoorBench", "attack": attack_name, "lens_attack": known_as,
                 "fit_error": None if fit_err is None else round(fit_err, 4)}
    trigger = StoredTrigger(shape, k, images, target=target, mapping=mapping, info=trig_info)

    run_name = run_dir.resolve().name
    method = defense_dir.name if defense_dir is not None else None
    reported = _read_csv_metrics(defense_dir, "*_df.csv") if defense_dir else _read_csv_metrics(run_dir, "attack_df.csv")
    lacks = _lacks(tr_idx, tr_px, fit_a is not None, fit_err, bool(info), bool(reported), defense_dir is not None)
    card: dict[str, Any] = {
        "name": name or (f"{run_name}+{method}" if method else run_name),
        "arch": arch, "arch_kwargs": arch_kwargs, "classes": list(pair.classes), "input_shape": list(shape),
        "normalization": {"mean": list(ds["mean"]), "std": list(ds["std"])},
        "data": data_spec,
        "trigger": trigger.spec(),
        "provenance": {"source": "BackdoorBench defense result" if method else "BackdoorBench attack run",
                       "run": str(run_dir.resolve()), "file": str(weights_file.resolve()), "defense": method,
                       "attack": attack_name, "lens_attack": known_as},
        "backdoorbench": {
            "model_name": str(model_name), "clean_data": clean_data, "attack": attack_name, "lens_attack": known_as,
            "target": target,
            "mapping": mapping, "n_bd_test": int(len(test_idx)), "n_train_poisoned": int(len(poison_idx)),
            "n_train_noise": int(len(noise_idx)), "key_changes": key_notes, "notes": notes, "lacks": lacks,
            "reported": reported,
        },
    }
    plan = None
    if tr_px is not None:
        plan = PoisonPlan(torch.from_numpy(poison_idx), torch.from_numpy(noise_idx))
        card["poison"] = {"rate": round(len(poison_idx) / max(len(pair.train), 1), 6),
                          "n_poisoned": int(len(poison_idx)), "n_noise": int(len(noise_idx)),
                          "source": "BackdoorBench bd_train PNGs"}
    suspect = Suspect(model, card, None, _plan=plan, _trigger_override=trigger)
    suspect.__dict__["data"] = pair  # already loaded and checked; fills the cached property
    return suspect


# --- loader hooks --------------------------------------------------------------------------------------------


def _data_root_from(data: Any) -> str | None:
    if isinstance(data, dict):
        return data.get("root")
    if isinstance(data, str) and data not in DATASETS:
        return data
    return None


def _load_stored_folder(folder: Path) -> Suspect:
    suspect = _load_folder(folder)
    spec = suspect.card["trigger"]
    file = folder / str((spec.get("params") or {}).get("file") or STORED_FILE)
    if file.name != STORED_FILE or not file.is_file():
        raise SuspectLoadError(f"{folder} is an imported suspect but lacks its stored poisoned images ({STORED_FILE})")
    try:
        suspect._trigger_override = StoredTrigger.from_file(file, spec, suspect.input_shape, suspect.num_classes)
    except ValueError as err:
        raise SuspectLoadError(f"{folder}: {err}") from err
    return suspect


def load_hook(path: Path, data: Any = None, arch: str | None = None, **_: Any) -> Suspect | None:
    """``suspects.load`` hook: BackdoorBench runs / defense results, and saved suspects with a stored trigger.

    A ``defense_result.pt`` outside its run opens as a bare state dict when ``arch`` is named.
    """
    if path.is_dir() and (path / CARD_FILE).is_file():
        try:
            spec = json.loads((path / CARD_FILE).read_text()).get("trigger") or {}
        except (OSError, ValueError, AttributeError):
            return None
        return _load_stored_folder(path) if isinstance(spec, dict) and spec.get("name") == StoredTrigger.name else None
    try:
        found = find_run(path)
    except SuspectLoadError:
        if arch is not None and path.is_file():
            return None
        raise
    return None if found is None else import_run(path, data_root=_data_root_from(data))



# --- export ------------------------------------------------------------------------------------------------


def _bb_model_name(suspect: Suspect) -> str:
    arch = str(suspect.card.get("arch") or getattr(suspect.model, "arch_name", ""))
    names = {v: k for k, v in {**MODEL_NAMES, **TORCHVISION_MODELS}.items()}
    if arch not in names:
        raise SuspectLoadError(f"architecture {arch!r} has no BackdoorBench counterpart; exportable: "
                               f"{', '.join(f'{a} (as {b})' for a, b in names.items())}")
    return names[arch]


def _export_state_dict(suspect: Suspect, bb_name: str) -> OrderedDict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in suspect.model.state_dict().items()}
    for block, gamma in get_skip_gammas(suspect.model, non_default_only=True).items():
        conv, bn = f"{block}.shortcut.0.weight", f"{block}.shortcut.1.weight"
        if bn in sd:  # post-activation block: gamma * BN(conv(x)) is a BN with scaled weight and bias
            sd[bn] = sd[bn] * gamma
            sd[f"{block}.shortcut.1.bias"] = sd[f"{block}.shortcut.1.bias"] * gamma
        elif conv in sd:  # pre-activation block: gamma * conv(a) is a conv with scaled weight
            sd[conv] = sd[conv] * gamma
        else:
            raise SuspectLoadError(
                f"block {block} scales an identity skip connection by gamma={gamma}, which {bb_name} cannot "
                f"express (no shortcut layer to fold it into); export is not possible for this suspect")
    if bb_name == "resnet18":
        sd = {tv_resnet.torchvision_key(k): v for k, v in sd.items()}
    elif bb_name in TORCHVISION_MODELS:
        from .adapters import to_library_keys

        sd = to_library_keys(sd)
        if bb_name in RESIZED_MODELS:
            sd = {f"1.{k}": v for k, v in sd.items()}
    return OrderedDict(sd)


def export_notes(suspect: Suspect) -> list[str]:
    """Why an exported file may not behave the same inside BackdoorBench (empty when it will)."""
    notes = []
    data = (suspect.card.get("data") or {}).get("name")
    bb_data = next((k for k, v in DATASETS.items() if v["source"] == data), None)
    norm = suspect.card.get("normalization") or {}
    if bb_data is None:
        notes.append(f"data source {data!r} is not one of BackdoorBench's datasets ({', '.join(DATASETS)})")
    elif norm.get("mean") is not None and (
            not np.allclose(norm["mean"], DATASETS[bb_data]["mean"]) or not np.allclose(norm["std"], DATASETS[bb_data]["std"])):
        notes.append(f"the model normalises with mean {norm['mean']} / std {norm['std']}, BackdoorBench's {bb_data} "
                     f"pipeline with {DATASETS[bb_data]['mean']} / {DATASETS[bb_data]['std']}")
    width = (suspect.card.get("arch_kwargs") or {}).get("width", 64)
    if int(width) != 64:
        notes.append(f"width {width}: BackdoorBench builds its networks with width 64, so its own loader will refuse "
                     f"the shapes (Backdoor Lens opens the file)")
    return notes


def export_backdoorbench(suspect: Suspect, out: str | os.PathLike, method: str | None = None) -> Path:
    """Write ``defense_result.pt`` (``{'model_name', 'num_classes', 'model'}``) in BackdoorBench's layout.

    With ``method`` the file goes to ``out/defense/<method>/`` (``out`` being the attack run's folder), as
    BackdoorBench's defenses place it; otherwise to ``out/``. Non-default skip scales are folded into the
    shortcut layers; one on an identity skip cannot be expressed and raises :class:`SuspectLoadError`.
    """
    bb_name = _bb_model_name(suspect)
    folder = Path(out).expanduser()
    if method:
        if "/" in method or "\\" in method or method in (".", ".."):
            raise SuspectLoadError(f"method {method!r} must be a plain folder name")
        folder = folder / "defense" / method
    folder.mkdir(parents=True, exist_ok=True)
    obj = {"model_name": bb_name, "num_classes": suspect.num_classes, "model": _export_state_dict(suspect, bb_name)}
    with replacing(folder / DEFENSE_FILE) as tmp:
        torch.save(obj, tmp)
    return folder / DEFENSE_FILE
