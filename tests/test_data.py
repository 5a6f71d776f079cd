import gzip
import struct

import numpy as np
import pytest
import torch
from conftest import DEBIAN_FMNIST, SHARED_CIFAR

from suspects.data import DatasetNotFoundError, ImageSet, defense_pool_split, load_dataset, read_idx


def write_idx(path, array, compress=False):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("x.idx" + (".gz" if compress else ""))
    write_idx(p, arr, compress)
    assert np.array_equal(read_idx(p), arr)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="expected 5 bytes"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_layout_from_idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n in [("train", 20), ("t10k", 8)]:
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8), compress=True)
    pair = load_dataset({"name": "mnist", "root": str(tmp_path)})
    assert len(pair.train) == 20 and len(pair.test) == 8
    assert pair.input_shape == (1, 28, 28) and pair.classes[3] == "3"
    x = pair.train.images([0, 1])
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    pair = load_dataset("fashion-mnist")
    assert len(pair.train) == 60000 and len(pair.test) == 10000
    assert pair.classes[0] == "T-shirt/top" and pair.input_shape == (1, 28, 28)


def test_demo_bundle(demo_pair):
    assert len(demo_pair.train) == 10000 and len(demo_pair.test) == 2500
    assert demo_pair.train.labels.bincount().tolist() == [1000] * 10
    assert demo_pair.classes[9] == "Ankle boot"


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="../shared/datasets/cifar10-jpeg is absent")
def test_imagefolder_on_shared_cifar10():
    pair = load_dataset({"name": "imagefolder", "root": str(SHARED_CIFAR), "limit_per_class": 3})
    assert pair.classes[:3] == ["airplane", "automobile", "bird"] and len(pair.classes) == 10
    assert len(pair.train) == 30 and len(pair.test) == 30
    assert pair.input_shape == (3, 32, 32)
    assert pair.train.labels.tolist() == sorted(pair.train.labels.tolist())
    assert pair.train.pixels.float().std() > 10  # real images, not blanks


def test_imagefolder_without_split_is_split_deterministically(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (8, 8), color=(i * 20, 0, 0)).save(tmp_path / cls / f"{i}.png")
    p1 = load_dataset({"name": "imagefolder", "root": str(tmp_path), "test_fraction": 0.2})
    p2 = load_dataset(str(tmp_path))
    assert len(p1.test) == 4 and len(p1.train) == 16
    assert torch.equal(p1.test.pixels, p2.test.pixels)


def test_missing_datasets_give_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset({"name": "cifar10", "root": str(tmp_path)})
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset({"name": "imagefolder", "root": str(tmp_path / "nothing")})
    with pytest.raises(DatasetNotFoundError, match="IDX files"):
        load_dataset({"name": "mnist", "root": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown data source"):
        load_dataset({"name": "imagenet-22k"})


def test_defense_pool_split_is_deterministic_and_disjoint():
    rest, pool = defense_pool_split(1000, 0.05, seed=0)
    assert len(pool) == 50 and len(rest) == 950
    assert not set(pool.tolist()) & set(rest.tolist())
    assert torch.equal(pool, defense_pool_split(1000, 0.05, seed=0)[1])
    assert not torch.equal(pool, defense_pool_split(1000, 0.05, seed=1)[1])
    with pytest.raises(ValueError):
        defense_pool_split(10, 1.5)


def test_imageset_validation():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.rand(2, 1, 4, 4), torch.zeros(2), ["a", "b"])
    with pytest.raises(ValueError, match="labels must lie"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), ["a", "b"])
