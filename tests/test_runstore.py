"""Run store durability and the background job queue."""

import os
import signal
import subprocess
import sys
import time

import pytest

import suspects
from runs.jobs import device_lock, execute, submit
from runs.store import RunStore
from suspects.models import create_model
from suspects.store import Suspect


def tiny_suspect():
    model = create_model("preact_resnet18", num_classes=10, in_channels=1, width=2)
    card = {"name": "tiny", "arch": "preact_resnet18", "arch_kwargs": {"width": 2},
            "classes": [str(i) for i in range(10)], "input_shape": [1, 28, 28]}
    return Suspect(model, card)


def test_finish_is_atomic_and_listed(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create("finetune", "demo:badnets", "quick", {}, 100, 0)
    assert store.get(rid).status == "queued" and store.finished_suspects() == []
    folder = store.finish(rid, {"ba": 0.9, "asr": 0.1}, tiny_suspect(), "log")
    assert store.get(rid).status == "finished"
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "suspect.json", "report.json", "log.txt"}
    assert store.finished_suspects() == [str(folder)]
    assert suspects.load(folder).name == "tiny"
    assert not list(tmp_path.glob(".*partial"))


def test_a_crash_mid_write_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    rid = store.create("finetune", "demo:badnets", "quick", {}, 100, 0)
    store.mark_running(rid, os.getpid())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("runs.store.json.dumps", boom)
    with pytest.raises(OSError):
        store.finish(rid, {"ba": 0.9}, tiny_suspect())
    monkeypatch.undo()
    assert store.get(rid).status == "running"
    assert store.finished_suspects() == []
    assert not (tmp_path / rid).exists() and not list(tmp_path.glob(".*partial"))


def test_a_killed_worker_marks_its_run_interrupted(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create("finetune", "demo:badnets", "quick", {}, 100, 0)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store.mark_running(rid, proc.pid)
    assert store.reconcile() == []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store.reconcile() == [rid]
    rec = store.get(rid)
    assert rec.status == "interrupted" and "ended before the run finished" in rec.error
    assert store.finished_suspects() == []


def test_cancel_a_queued_run(tmp_path):
    store = RunStore(tmp_path)
    rid = store.create("finetune", "demo:badnets", "quick", {}, 100, 0)
    store.request_cancel(rid)
    assert store.get(rid).status == "cancelled"
    assert store.claim_next(os.getpid()) is None


def test_cancel_a_running_run(tmp_path):
    store = RunStore(tmp_path)
    rid = submit(store, "finetune", "demo:badnets", "quick", {"steps": 100}, pool_size=100, start_worker=False)
    store.claim_next(os.getpid())
    calls = []

    def hook(fraction, message, metrics):
        calls.append(fraction)
        if len(calls) == 3:
            store.request_cancel(rid)

    assert execute(store, rid, progress_hook=hook) == "cancelled"
    assert store.get(rid).status == "cancelled" and store.finished_suspects() == []


def test_submit_refuses_nonsense_before_queueing(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match="'steps' must lie in"):
        submit(store, "finetune", "demo:badnets", "quick", {"steps": -3}, start_worker=False)
    with pytest.raises(ValueError, match="pool size"):
        submit(store, "finetune", "demo:badnets", "quick", {}, pool_size=0, start_worker=False)
    assert store.list() == []


def test_background_worker_runs_the_queue_in_order(tmp_path):
    store = RunStore(tmp_path)
    a = submit(store, "linf_prune", "demo:badnets", "quick", {"max_ratio": 0.05}, pool_size=100)
    b = submit(store, "finetune", "demo:badnets", "quick", {"steps": 2}, pool_size=100)
    deadline = time.time() + 240
    while time.time() < deadline and any(store.get(r).active for r in (a, b)):
        time.sleep(1)
    ra, rb = store.get(a), store.get(b)
    assert ra.status == "finished" and rb.status == "finished", (ra.error, rb.error)
    assert ra.started <= rb.started and ra.finished <= rb.started + 1e-3  # one at a time
    assert len(store.events(a)) >= 1
    report = store.report(a)
    assert report["defense"] == "linf_prune" and report["run_dir"] == ra.run_dir
    with device_lock(store, wait=False) as free:
        assert free  # the worker exited and released the device
