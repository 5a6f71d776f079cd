"""Datasets: one return type (:class:`ImageSet`) for every source, and deterministic splits.

Sources are named by a small JSON-able spec (``{"name": "demo"}``,
``{"name": "fashion-mnist", "root": ...}``, ``{"name": "imagefolder", "root": ...}`` ...) so a suspect
card can say where its data came from and :func:`load_dataset` can find it again.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ImageSet",
    "DatasetPair",
    "DatasetNotFoundError",
    "DatasetChecksumError",
    "DEMO_DATA",
    "FASHION_MNIST_CLASSES",
    "load_dataset",
    "read_idx",
    "defense_pool_split",
    "list_sources",
    "DEV_SOURCE",
    "fashion_mnist_dev_indices",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_DATA = ASSETS / "demo" / "fashion_mnist_subset.npz"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk (and was not, or could not be, downloaded)."""


class DatasetChecksumError(DatasetNotFoundError):
    """A dataset's files are on disk but differ from the download torchvision checks them against (``.files``:
    ``(file, md5 found, md5 expected)`` per differing file)."""

    def __init__(self, message: str, files: list[tuple[str, str, str]]):
        super().__init__(message)
        self.files = files


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cifar10_checksums(folder: Path) -> list[tuple[str, str, str]]:
    """``(file, md5 found, md5 expected)`` for CIFAR-10 batch files present in ``folder`` that torchvision rejects."""
    import torchvision

    bad = []
    ds = torchvision.datasets.CIFAR10
    for name, expected in ds.train_list + ds.test_list:
        f = folder / name
        if f.is_file():
            found = _md5(f)
            if found != expected:
                bad.append((name, found, expected))
    return bad


@dataclass
class ImageSet:
    """Images with integer labels.

    ``pixels`` holds uint8 images (N, C, H, W); :meth:`images` gives float32 in [0, 1].
    Keeping uint8 in memory makes CIFAR-sized sets cheap; every model consumes [0, 1] floats.
    """

    pixels: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.dim() != 4:
            raise ValueError("pixels must be a uint8 tensor of shape (N, C, H, W)")
        self.labels = self.labels.long()
        if len(self.labels) != len(self.pixels):
            raise ValueError(f"{len(self.pixels)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def images(self, index: torch.Tensor | Sequence[int] | slice | None = None) -> torch.Tensor:
        """Float32 images in [0, 1] for ``index`` (all when None)."""
        px = self.pixels if index is None else self.pixels[index]
        return px.float().div_(255.0)

    def subset(self, index: torch.Tensor | Sequence[int], name: str | None = None) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.pixels[index], self.labels[index], list(self.classes), name or self.name)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units (for the model's normalise layer)."""
        x = self.pixels[: min(len(self), 10000)].float().div(255.0)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


@dataclass
class DatasetPair:
    train: ImageSet
    test: ImageSet
    spec: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.input_shape


# --- IDX (MNIST / Fashion-MNIST raw files) ----------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(_IDX_TYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data for shape {shape}, found {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_idx_pair(name: str, root: str | None, classes: list[str], torchvision_dir: str) -> DatasetPair:
    candidates: list[Path] = []
    if root:
        r = Path(root).expanduser()
        candidates += [r, r / torchvision_dir / "raw"]
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    candidates.append(Path("~/.cache/backdoor-lens").expanduser() / torchvision_dir / "raw")
    stems = {
        "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
    }
    for folder in candidates:
        files = {k: _find_idx(folder, s) for k, s in stems.items()}
        if all(files.values()):
            arrays = {k: read_idx(p) for k, p in files.items()}  # type: ignore[arg-type]
            train = ImageSet(torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
                             torch.from_numpy(arrays["train_y"].astype(np.int64)), classes, f"{name}/train")
            test = ImageSet(torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
                            torch.from_numpy(arrays["test_y"].astype(np.int64)), classes, f"{name}/test")
            return DatasetPair(train, test, {"name": name, "root": str(folder)})
    looked = "\n  ".join(str(c) for c in candidates)
    hint = " (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise DatasetNotFoundError(
        f"{name}: IDX files ({', '.join(stems.values())}, optionally .gz) not found in any of:\n  {looked}{hint}"
    )


# --- torchvision-backed sources -----------------------------------------------------------------


def _torchvision_pair(name: str, root: str | None, download: bool) -> DatasetPair:
    import torchvision

    root_path = Path(root or "~/.cache/backdoor-lens").expanduser()
    expected = {"cifar10": root_path / "cifar-10-batches-py", "gtsrb": root_path / "gtsrb"}[name]
    try:
        if name == "cifar10":
            tr = torchvision.datasets.CIFAR10(str(root_path), train=True, download=download)
            te = torchvision.datasets.CIFAR10(str(root_path), train=False, download=download)
            train = ImageSet(torch.from_numpy(tr.data).permute(0, 3, 1, 2).contiguous(),
                             torch.tensor(tr.targets), CIFAR10_CLASSES, "cifar10/train")
            test = ImageSet(torch.from_numpy(te.data).permute(0, 3, 1, 2).contiguous(),
                            torch.tensor(te.targets), CIFAR10_CLASSES, "cifar10/test")
        else:
            tr = torchvision.datasets.GTSRB(str(root_path), split="train", download=download)
            te = torchvision.datasets.GTSRB(str(root_path), split="test", download=download)
            classes = [str(i) for i in range(43)]
            train = _pil_samples_to_set(tr._samples, classes, "gtsrb/train")
            test = _pil_samples_to_set(te._samples, classes, "gtsrb/test")
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        bad = _cifar10_checksums(expected) if name == "cifar10" and expected.is_dir() else []
        if bad:
            listed = "; ".join(f"{f}: md5 {got}, expected {want}" for f, got, want in bad)
            raise DatasetChecksumError(
                f"{name} at {expected}: checksum mismatch: {len(bad)} file(s) differ from torchvision's download "
                f"({listed}), and torchvision refuses files it cannot verify. Replace them with torchvision's "
                f"original files, or use an image-folder copy of the data", bad) from err
        raise DatasetNotFoundError(
            f"{name} not found at {expected}: place torchvision's files there, or let torchvision download them "
            f"on a machine that is online (library: download=True; backdoor-lens train --download). ({err})"
        ) from err
    except OSError as err:  # offline download attempt
        raise DatasetNotFoundError(
            f"{name}: download failed ({err}); this machine seems offline. Place torchvision's files at {expected}."
        ) from err
    return DatasetPair(train, test, {"name": name, "root": str(root_path)})


def _pil_samples_to_set(samples: list[tuple[str, int]], classes: list[str], name: str, size: int = 32) -> ImageSet:
    from PIL import Image

    pixels = np.empty((len(samples), 3, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        with Image.open(path) as im:
            pixels[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
    labels = torch.tensor([label for _, label in samples])
    return ImageSet(torch.from_numpy(pixels), labels, classes, name)


# --- ImageFolder -------------------------------------------------------------------------------------

_IMG_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def _read_image_folder(folder: Path, classes: list[str] | None, limit_per_class: int | None,
                       size: int | None, name: str) -> ImageSet:
    from PIL import Image

    if classes is None:
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{folder} has no class sub-folders (expected ImageFolder layout root/class/img)")
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        cls_dir = folder / cls
        if not cls_dir.is_dir():
            raise DatasetNotFoundError(f"{folder}: class folder {cls!r} is missing (classes come from the train split)")
        imgs = sorted(p for p in cls_dir.iterdir() if p.suffix.lower() in _IMG_EXT)
        if limit_per_class is not None:
            imgs = imgs[:limit_per_class]
        files += [(p, label) for p in imgs]
    if not files:
        raise DatasetNotFoundError(f"{folder}: no images found")
    with Image.open(files[0][0]) as im:
        mode = "L" if im.mode in ("L", "1", "I;16") else "RGB"
        w, h = im.size
    hw = (size, size) if size else (h, w)
    c = 1 if mode == "L" else 3
    pixels = np.empty((len(files), c, hw[0], hw[1]), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        with Image.open(path) as im:
            im = im.convert(mode)
            if im.size != (hw[1], hw[0]):
                im = im.resize((hw[1], hw[0]), Image.BILINEAR)
            arr = np.asarray(im)
            pixels[i] = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return ImageSet(torch.from_numpy(pixels), torch.tensor([lbl for _, lbl in files]), list(classes), name)


def _index_ordered(folder: Path, classes: list[str] | None, split: str) -> ImageSet:
    """An ImageFolder split whose file names are the images' indices (``<class>/<index>.png``), in index order."""
    if classes is None:
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    stems: list[int] = []
    for cls in classes:
        cls_dir = folder / cls
        if not cls_dir.is_dir():
            raise DatasetNotFoundError(f"{folder}: class folder {cls!r} is missing (classes come from the train split)")
        for p in sorted(p for p in cls_dir.iterdir() if p.suffix.lower() in _IMG_EXT):  # as _read_image_folder
            if not p.stem.isdigit():
                raise DatasetNotFoundError(
                    f"{p}: in an index-ordered image folder every file is named by its image's index in the split "
                    f"(<class>/<index>.png); {p.name!r} is not a number")
            stems.append(int(p.stem))
    index = np.asarray(stems, dtype=np.int64)
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        raise DatasetNotFoundError(f"{folder}: the file names are not the indices 0..{len(index) - 1} of the split, "
                                   f"each once")
    full = _read_image_folder(folder, classes, None, None, split)  # class-major, in the order of ``stems``
    return full.subset(torch.from_numpy(np.argsort(index, kind="stable")), split)


def _imagefolder_pair(root: str, limit_per_class: int | None, size: int | None,
                      test_fraction: float, seed: int, order: str = "sorted") -> DatasetPair:
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetNotFoundError(f"ImageFolder root {root_path} does not exist")
    if order == "index":
        if not ((root_path / "train").is_dir() and (root_path / "test").is_dir()):
            raise DatasetNotFoundError(f"{root_path}: an index-ordered image folder needs train/ and test/")
        train = _index_ordered(root_path / "train", None, "imagefolder/train")
        test = _index_ordered(root_path / "test", train.classes, "imagefolder/test")
        return DatasetPair(train, test, {"name": "imagefolder", "root": str(root_path), "order": "index"})
    if order != "sorted":
        raise ValueError(f"imagefolder order must be 'sorted' or 'index', got {order!r}")
    spec = {"name": "imagefolder", "root": str(root_path), "limit_per_class": limit_per_class, "size": size}
    if (root_path / "train").is_dir() and (root_path / "test").is_dir():
        train = _read_image_folder(root_path / "train", None, limit_per_class, size, "imagefolder/train")
        test = _read_image_folder(root_path / "test", train.classes, limit_per_class, size, "imagefolder/test")
        return DatasetPair(train, test, spec)
    full = _read_image_folder(root_path, None, limit_per_class, size, "imagefolder")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(full), generator=gen)
    n_test = max(1, int(round(len(full) * test_fraction)))
    spec.update(test_fraction=test_fraction, seed=seed)
    return DatasetPair(full.subset(perm[n_test:], "imagefolder/train"), full.subset(perm[:n_test], "imagefolder/test"), spec)


# --- demo bundle ------------------------------------------------------------------------------------


def _demo_pair(path: str | None = None) -> DatasetPair:
    p = Path(path) if path else DEMO_DATA
    if not p.is_file():
        raise DatasetNotFoundError(f"demo bundle not found at {p}; the repository ships it under assets/demo/")
    with np.load(p) as z:
        classes = [str(c) for c in z["classes"]]
        train = ImageSet(torch.from_numpy(z["train_x"]).unsqueeze(1), torch.from_numpy(z["train_y"].astype(np.int64)),
                         classes, "demo/train")
        test = ImageSet(torch.from_numpy(z["test_x"]).unsqueeze(1), torch.from_numpy(z["test_y"].astype(np.int64)),
                        classes, "demo/test")
    return DatasetPair(train, test, {"name": "demo"})


# --- development data: Fashion-MNIST images the demo bundle does not use ------------------------------------------

DEV_SOURCE = "fashion-mnist-dev"
DEV_SEED = 2028  # the selection's random seed (numpy's default_rng)
DEV_TRAIN_PER_CLASS = 1000  # as the bundle: 10,000 training images ...
DEV_TEST_PER_CLASS = 250  # ... and 2,500 evaluation images


def fashion_mnist_dev_indices(train_labels: np.ndarray, bundle_train_index: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` indices into Fashion-MNIST's 60,000 *training* images of the development source: per class,
    a random permutation (``numpy.random.default_rng(2028)``, classes 0..9 in order) of the training images of that
    class that the demo bundle does not train on (``train_source_index``), of which the first 1,000 train and the
    next 250 evaluate; each list sorted. The bundle's test split comes from Fashion-MNIST's test file, so neither
    part shares an image with the bundle."""
    free = np.setdiff1d(np.arange(len(train_labels)), bundle_train_index)
    rng = np.random.default_rng(DEV_SEED)
    tr, te = [], []
    for c in range(10):
        pick = rng.permutation(free[train_labels[free] == c])
        tr.append(pick[:DEV_TRAIN_PER_CLASS])
        te.append(pick[DEV_TRAIN_PER_CLASS:DEV_TRAIN_PER_CLASS + DEV_TEST_PER_CLASS])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


def _dev_pair(root: str | None) -> DatasetPair:
    train, test = _dev_sets(root)
    return DatasetPair(train.subset(torch.arange(len(train))), test.subset(torch.arange(len(test))),
                       {"name": DEV_SOURCE})


@functools.lru_cache(maxsize=2)
def _dev_sets(root: str | None) -> tuple[ImageSet, ImageSet]:
    """The ``fashion-mnist-dev`` source (:func:`fashion_mnist_dev_indices`): the development suspects' training
    images, defense pool and evaluation split, none of them in the demo bundle. Checks first that the full
    Fashion-MNIST found on disk is the one the bundle was cut from."""
    full = _load_idx_pair("fashion-mnist", root, FASHION_MNIST_CLASSES, "FashionMNIST")
    if not DEMO_DATA.is_file():
        raise DatasetNotFoundError(f"{DEV_SOURCE}: the demo bundle ({DEMO_DATA}) is needed to know which images to "
                                   "leave out")
    with np.load(DEMO_DATA) as z:
        bundle_index = z["train_source_index"].astype(np.int64)
        bundle_x = z["train_x"]
    if not np.array_equal(full.train.pixels[torch.from_numpy(bundle_index), 0].numpy(), bundle_x):
        raise DatasetNotFoundError(f"{DEV_SOURCE}: the Fashion-MNIST at {full.spec.get('root')} is not the one the demo "
                                   "bundle was cut from (its images at the bundle's indices differ)")
    tr, te = fashion_mnist_dev_indices(full.train.labels.numpy(), bundle_index)
    return (full.train.subset(torch.from_numpy(tr), f"{DEV_SOURCE}/train"),
            full.train.subset(torch.from_numpy(te), f"{DEV_SOURCE}/test"))


_SOURCES = ("demo", "fashion-mnist", "mnist", "cifar10", "gtsrb", DEV_SOURCE, "imagefolder")


def list_sources() -> list[str]:
    return list(_SOURCES)


def load_dataset(spec: dict | str) -> DatasetPair:
    """Load train and test splits from a source spec (a dict, or just a source name).

    Keys: ``name`` (one of :func:`list_sources`), ``root`` (folder), ``download`` (torchvision
    sources only; default False), ``limit_per_class`` / ``size`` / ``test_fraction`` / ``seed``
    (ImageFolder), ``order`` (ImageFolder with ``train/`` and ``test/``: ``'sorted'``, class-major as read, or
    ``'index'``, files named by their index in the split and returned in that order, e.g. a copy of CIFAR-10 in
    torchvision's order). ``limit_train`` / ``limit_test`` (any source): keep only the first N images of that split
    (tiny suspects for tests; kept in the returned spec, so a card says so). Raises :class:`DatasetNotFoundError`
    with the expected path when absent, and :class:`DatasetChecksumError` when torchvision's files are there but
    differ from its download.
    """
    if isinstance(spec, str):
        spec = {"name": spec} if spec in _SOURCES else {"name": "imagefolder", "root": spec}
    pair = _load_source(spec)
    limits = {k: int(spec[k]) for k in ("limit_train", "limit_test") if spec.get(k) is not None}
    if not limits:
        return pair
    if any(n < 1 for n in limits.values()):
        raise ValueError(f"limit_train / limit_test must be positive, got {limits}")
    train, test = pair.train, pair.test
    if "limit_train" in limits:
        train = train.subset(torch.arange(min(limits["limit_train"], len(train))), train.name)
    if "limit_test" in limits:
        test = test.subset(torch.arange(min(limits["limit_test"], len(test))), test.name)
    return DatasetPair(train, test, {**pair.spec, **limits})


def _load_source(spec: dict) -> DatasetPair:
    name = spec.get("name")
    if name == "demo":
        return _demo_pair(spec.get("path"))
    if name == "fashion-mnist":
        return _load_idx_pair(name, spec.get("root"), FASHION_MNIST_CLASSES, "FashionMNIST")
    if name == DEV_SOURCE:
        return _dev_pair(spec.get("root"))
    if name == "mnist":
        return _load_idx_pair(name, spec.get("root"), MNIST_CLASSES, "MNIST")
    if name in ("cifar10", "gtsrb"):
        return _torchvision_pair(name, spec.get("root"), bool(spec.get("download", False)))
    if name == "imagefolder":
        if not spec.get("root"):
            raise ValueError("imagefolder source needs a 'root' folder")
        return _imagefolder_pair(spec["root"], spec.get("limit_per_class"), spec.get("size"),
                                 float(spec.get("test_fraction", 0.2)), int(spec.get("seed", 0)),
                                 str(spec.get("order", "sorted")))
    raise ValueError(f"unknown data source {name!r}; known: {', '.join(_SOURCES)}")


# --- standard normalisations and input shapes of the data sources ---------------------------------------------

# name -> (mean, std) per channel, in [0, 1] units. ``demo`` is the demo bundle's own (its training images'
# statistics, what the demo suspects were trained with); the others are the constants their usual training
# pipelines (torchvision references, BackdoorBench) use.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "none": ((0.0,), (1.0,)),
    "demo": ((0.2867000102996826,), (0.35339999198913574,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5,), (0.5,)),
}
# the standard normalisation of each data source (None: no standard; the user names one)
SOURCE_NORMALIZATION = {"demo": "demo", "fashion-mnist": "fashion-mnist", "mnist": "mnist", "cifar10": "cifar10",
                        "gtsrb": "none", DEV_SOURCE: "fashion-mnist"}
SOURCE_SHAPES = {"demo": (1, 28, 28), "fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32),
                 "gtsrb": (3, 32, 32), DEV_SOURCE: (1, 28, 28)}


def parse_normalization(text: str, channels: int) -> tuple[list[float], list[float], str]:
    """``(mean, std, label)`` from a name (:data:`NORMALIZATIONS`: ``imagenet``, ``cifar10``, ``none`` ...) or
    ``M1,...,Mc/S1,...,Sc``; a one-value name or list is repeated over ``channels``. Raises ValueError."""
    text = str(text).strip()
    if text.lower() in NORMALIZATIONS:
        mean, std = NORMALIZATIONS[text.lower()]
        label = text.lower()
    else:
        if "/" not in text:
            raise ValueError(f"normalisation {text!r}: give a name ({', '.join(NORMALIZATIONS)}) or means/stds as "
                             "M1,...,Mc/S1,...,Sc")
        m_text, _, s_text = text.partition("/")
        try:
            mean = tuple(float(v) for v in m_text.split(","))
            std = tuple(float(v) for v in s_text.split(","))
        except ValueError:
            raise ValueError(f"normalisation {text!r}: means and stds must be numbers (M1,...,Mc/S1,...,Sc)") from None
        label = text
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalisation {text!r} has {len(mean)} means / {len(std)} stds but the model takes "
                         f"{channels} input channel(s)")
    if any(not s > 0 for s in std):
        raise ValueError(f"normalisation {text!r}: standard deviations must be positive")
    return [float(v) for v in mean], [float(v) for v in std], label


def source_name(spec: dict | str | None) -> str | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        return spec if spec in _SOURCES else "imagefolder"
    return spec.get("name")


def source_input_shape(spec: dict | str | None) -> tuple[int, int, int] | None:
    """The (C, H, W) a data source gives without loading it (an image folder: 3 x ``size`` when given)."""
    name = source_name(spec)
    if name in SOURCE_SHAPES:
        return SOURCE_SHAPES[name]
    if name == "imagefolder" and isinstance(spec, dict) and spec.get("size"):
        return (3, int(spec["size"]), int(spec["size"]))
    return None


def defense_pool_split(n_train: int, fraction: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministically pick the clean *defense pool* from the training split.

    Returns ``(poisonable, pool)`` index tensors (sorted, disjoint, covering ``range(n_train)``).
    The pool is never poisoned; defenses may use it (the "5% clean training data" threat model of
    BackdoorBench). It is drawn from the training split, so it never overlaps the test split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"defense pool fraction must lie in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    perm = torch.randperm(n_train, generator=gen)
    n_pool = int(round(n_train * fraction))
    return perm[n_pool:].sort().values, perm[:n_pool].sort().values
