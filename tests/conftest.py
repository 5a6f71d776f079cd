"""Shared fixtures: small real data, tiny models, and paths to the optional datasets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
# never write into the checkout's ./lens-runs: every test session gets its own run store unless a test sets one
os.environ["BACKDOOR_LENS_RUNS"] = tempfile.mkdtemp(prefix="backdoor-lens-test-runs-")
# as on a fresh clone: the zoo holds only the demo bundle's seed-0 suspects, whatever `zoo build` left in assets/zoo/
os.environ["BACKDOOR_LENS_ZOO"] = tempfile.mkdtemp(prefix="backdoor-lens-test-zoo-")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def demo_pair():
    from suspects.data import load_dataset

    return load_dataset("demo")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    d = tmp_path / "runs"
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(d))
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: as fast alone, and far faster when other jobs share the two
    cores (two spinning OpenMP threads slow each other down). Use with ``pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
