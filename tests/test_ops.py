"""Operations (issues 12.4, 12.9, 17.4): thread counts, one reaped worker, reuse of the stored "before" metrics,
"after" on a subset with intervals, l_inf pruning that gives up, expected times."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

import suspects
from defenses import runner as runner_mod
from defenses.base import ParamError
from defenses.runner import parse_measure, run_defense
from runs import jobs
from runs.store import RunStore
from suspects.device import cpu_threads
from suspects.metrics import (
    data_fingerprint,
    evaluate,
    model_fingerprint,
    stamp_metrics,
    stored_metrics,
    wilson_interval,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- 12.4: one rule for thread counts ----------------------------------------------------------------------------


def test_thread_counts_never_exceed_the_cores(monkeypatch):
    monkeypatch.delenv("BACKDOOR_LENS_THREADS", raising=False)
    for cores in (1, 2, 4, 16):
        worker, ui = cpu_threads("worker", cores), cpu_threads("ui", cores)
        assert worker >= 1 and ui == 1
        assert worker + ui <= max(cores, 2)  # the dashboard and its worker together
        assert cpu_threads("cli", cores, worker_running=True) + worker <= max(cores, 2)
        assert cpu_threads("cli", cores) == cores  # alone, the CLI takes every core
    assert cpu_threads("worker", 2) == 1 and cpu_threads("worker", 8) == 7
    monkeypatch.setenv("BACKDOOR_LENS_THREADS", "3")
    assert cpu_threads("worker", 16) == 3 and cpu_threads("ui", 16) == 3
    monkeypatch.setenv("BACKDOOR_LENS_THREADS", "zero")
    with pytest.raises(ValueError, match="BACKDOOR_LENS_THREADS"):
        cpu_threads("cli")
    with pytest.raises(ValueError, match="role"):
        cpu_threads("gpu")


# --- 12.9: at most one worker, reaped -----------------------------------------------------------------------------


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to see zombies")
def test_ensure_worker_starts_one_and_reaps_it(tmp_path):
    store = RunStore(tmp_path)
    rid = jobs.submit(store, "finetune", "demo:badnets", "quick", {"steps": 2}, pool_size=100, start_worker=False)
    started = []
    for _ in range(12):  # the Defenses page calls it on every 1-s refresh while the run is queued
        proc = jobs.ensure_worker(store)
        if proc is not None:
            started.append(proc)
        time.sleep(0.05)
    assert len(started) == 1
    assert jobs.worker_running(store)
    store.request_cancel(rid)  # the queue empties: the worker exits on its own
    pid = started[0].pid
    deadline = time.time() + 120
    while time.time() < deadline and jobs.reap_workers():
        time.sleep(0.2)
    assert jobs.reap_workers() == 0
    assert not _zombie(pid) and not Path(f"/proc/{pid}").exists()
    assert not jobs.worker_running(store)


# --- 17.4: "before" from the card, "after" on a subset --------------------------------------------------------------


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = runner_mod.evaluate

    def counted(model, test, trigger=None, **kw):
        calls.append(len(test))
        return real(model, test, trigger, **kw)

    monkeypatch.setattr(runner_mod, "evaluate", counted)
    return calls


def test_before_metrics_come_from_the_card_when_weights_and_data_match(badnets, monkeypatch):
    calls = _counting(monkeypatch)
    first = run_defense("finetune", badnets, "quick", {"steps": 2}, pool_size=100)
    # the demo cards carry the fingerprints of their weights and data: only "after" is measured
    assert first["before_source"] == "card" and calls == [len(badnets.test)]
    assert (first["ba_before"], first["asr_before"]) == (badnets.card["metrics"]["ba"], badnets.card["metrics"]["asr"])
    repaired = first.suspect
    m = repaired.card["metrics"]
    assert m["model_fingerprint"] == model_fingerprint(repaired.model)
    assert m["data_fingerprint"] == data_fingerprint(repaired.test, repaired.trigger)

    calls.clear()
    second = run_defense("finetune", repaired, "quick", {"steps": 2}, pool_size=100)
    assert len(calls) == 1, "the stored metrics of the same weights and data are reused"
    assert second["before_source"] == "card"
    assert (second["ba_before"], second["asr_before"]) == (first["ba"], first["asr"])

    # the same card on other weights: measured again
    with torch.no_grad():
        next(repaired.model.parameters()).add_(0.01)
    assert stored_metrics(repaired.card, repaired.model, repaired.test, repaired.trigger) is None
    calls.clear()
    third = run_defense("finetune", repaired, "quick", {"steps": 2}, pool_size=100)
    assert len(calls) == 2 and third["before_source"] == "measured"


def test_the_card_metrics_are_what_a_measurement_gives(badnets, monkeypatch):
    """A reused "before" equals a fresh measurement of the same weights (the stamped demo card is honest)."""
    m = evaluate(badnets.model, badnets.test, badnets.trigger)
    assert stored_metrics(badnets.card, badnets.model, badnets.test, badnets.trigger) == m
    card = {**badnets.card, "metrics": {k: v for k, v in badnets.card["metrics"].items() if k != "model_fingerprint"}}
    calls = _counting(monkeypatch)
    report = run_defense("linf_prune", suspects.Suspect(badnets.model, card), "quick", {"max_ratio": 0.02},
                         pool_size=100)
    assert report["before_source"] == "measured" and len(calls) == 2
    assert (report["ba_before"], report["asr_before"]) == (m.ba, m.asr)


def test_stored_metrics_need_the_same_test_split_and_trigger(badnets):
    m = evaluate(badnets.model, badnets.test, badnets.trigger)
    card = {"metrics": stamp_metrics(m, badnets.model, badnets.test, badnets.trigger)}
    assert stored_metrics(card, badnets.model, badnets.test, badnets.trigger) == m
    fewer = badnets.test.subset(torch.arange(len(badnets.test) - 1))
    assert stored_metrics(card, badnets.model, fewer, badnets.trigger) is None
    assert stored_metrics(card, badnets.model, badnets.test, None) is None


def test_after_on_a_subset_with_intervals(badnets):
    report = run_defense("finetune", badnets, "quick", {"steps": 2}, pool_size=100, measure="subset:200")
    assert report["n_clean"] == 200 and report["measured_on"] == "200 random images of the test split"
    for key in ("ba", "asr", "ra"):
        lo, hi = report["ci95"][key]
        assert lo <= report[key] <= hi and hi - lo < 0.2
    assert "model_fingerprint" not in report.suspect.card["metrics"]  # a subset is never reused as a "before"
    lo, hi = report["ci95_before"]["ba"]
    assert hi - lo < report["ci95"]["ba"][1] - report["ci95"]["ba"][0]  # the full split is the narrower one


def test_measure_option_and_wilson_interval():
    assert parse_measure("full") is None and parse_measure(None) is None and parse_measure("subset:500") == 500
    for bad in ("subset:0", "subset:x", "half"):
        with pytest.raises(ParamError, match="measure"):
            parse_measure(bad)
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(1.0, 50)
    assert hi == 1.0 and 0.92 < lo < 0.94
    assert wilson_interval(None, 10) is None


def test_a_queued_run_keeps_its_measure_option(tmp_path):
    store = RunStore(tmp_path)
    rid = jobs.submit(store, "finetune", "demo:badnets", "quick", {"steps": 2}, pool_size=100,
                      start_worker=False, measure="subset:150")
    recorded = []  # what the store records as the run's message (what the pages show)
    update = store.update_progress
    store.update_progress = lambda *a, **k: (recorded.append(a[2]), update(*a, **k))[1]
    assert store.get(rid).params["_measure"] == "subset:150"
    with pytest.raises(ParamError):
        jobs.submit(store, "finetune", "demo:badnets", "quick", {}, pool_size=100, start_worker=False,
                    measure="subset:-1")
    store.claim_next(os.getpid())
    assert jobs.execute(store, rid) == "finished"
    report = store.report(rid)
    assert report["n_clean"] == 150
    # 'after' is measured under its own message, recorded at once after the last step (issue 27.8)
    after = [m for m in recorded if m.startswith("measuring after: the repaired model on 150 test images")]
    assert after and recorded.index(after[0]) < len(recorded) - 1
    assert jobs._new_phase("step 69/70", "step 70/70") is False and jobs._new_phase("step 70/70", after[0])


# --- 17.4: l_inf pruning gives up instead of pruning half the layer ------------------------------------------------


def test_linf_pruning_reports_failure_when_asr_does_not_move(badnets):
    # on the demo BadNets model the held-out ASR stays at 1.0 for the first 10 of the 128 channels
    report = run_defense("linf_prune", badnets, "quick", {"give_up_share": 0.07, "give_up_asr": 0.99}, pool_size=300)
    arts = report["artifacts"]
    assert arts["failed"] is True and arts["n_pruned"] == 0 and "does not remove" in arts["reason"]
    curve = report["curves"]["prune_curve"]
    assert curve[-1]["pruned"] == math.ceil(0.07 * arts["n_channels"]) == 9  # where it gave up
    assert curve[-1]["held_out_asr"] >= 0.99
    assert report["asr"] == pytest.approx(report["asr_before"])  # returned unpruned
    ok = run_defense("linf_prune", badnets, "quick", pool_size=300)  # the default rule lets it work here
    assert ok["artifacts"]["failed"] is False and ok["artifacts"]["n_pruned"] > 9


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to see zombies")
def test_defenses_page_starts_at_most_one_worker_and_reaps_it(tmp_path, monkeypatch):
    """Issue 12.9: the page refreshes every second while a run is queued; it must start one worker, not one per
    refresh, and leave no defunct process behind."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path))
    store = RunStore(tmp_path)
    rid = jobs.submit(store, "finetune", "demo:badnets", "quick", {"steps": 2}, pool_size=100, start_worker=False)
    started: list[subprocess.Popen] = []

    def popen(cmd, **kw):  # a stand-in worker: a real child process that ends by itself, without running anything
        assert cmd[1:3] == ["-m", "runs.worker"]
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)"], **kw)
        started.append(proc)
        return proc

    monkeypatch.setattr(jobs, "subprocess", SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT,
                                                            DEVNULL=subprocess.DEVNULL))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py"), default_timeout=240)
    at.query_params["suspect"] = "demo:badnets"
    at.run()
    at.switch_page("views/defenses.py").run()
    assert not at.exception, at.exception
    for _ in range(4):  # refreshes while the run stays queued
        at.run()
        assert not at.exception, at.exception
    assert len(started) == 1
    assert any("Queued" in i.value for i in at.info)
    store.request_cancel(rid)
    time.sleep(5)  # the stand-in exits; nobody has waited for it yet
    assert _zombie(started[0].pid)
    at.run()  # the next page run reaps it
    assert not at.exception, at.exception
    assert not _zombie(started[0].pid) and jobs.reap_workers() == 0


# --- 12.4: elapsed, ETA and the expected time of a run ---------------------------------------------------------------


def test_eta_text_and_durations():
    from runs.timing import eta_text, fmt_duration

    assert fmt_duration(42) == "0:42" and fmt_duration(4210) == "1:10:10"
    assert eta_text(0.25, 30) == "elapsed 0:30, about 1:30 left"
    assert eta_text(0.0, 5) == "elapsed 0:05"  # nothing to extrapolate from yet
    assert eta_text(1.0, 65) == "elapsed 1:05"


def test_expected_time_is_measured_from_the_store_else_estimated(tmp_path, badnets):
    from runs.timing import budget_passes, expected_time

    store = RunStore(tmp_path)
    first = expected_time(store, "finetune", "quick", {"steps": 2}, badnets, "demo:badnets", 100, "cpu")
    assert first.source == "estimated" and first.seconds > 0 and "estimated" in first.text()
    # several timed steps: the fastest gives the figure, the median the top of its range (issue 27.8)
    assert first.low == first.seconds <= first.high and "the fastest and the median" in first.text()
    rid = jobs.submit(store, "finetune", "demo:badnets", "quick", {"steps": 2}, pool_size=100, start_worker=False,
                      device="cpu")
    store.claim_next(os.getpid())
    assert jobs.execute(store, rid, suspect=badnets) == "finished"
    seconds = store.report(rid)["seconds"]
    again = expected_time(store, "finetune", "quick", {"steps": 2}, badnets, "demo:badnets", 100, "cpu")
    assert (again.source, again.n_runs, again.seconds) == ("measured", 1, seconds)
    assert "measured from 1 run" in again.text()
    # another suspect of the same architecture and data, with no run of its own, gets the history of this one
    blended = suspects.load("demo:blended")
    similar = expected_time(store, "finetune", "quick", {"steps": 2}, blended, "demo:blended", 100, "cpu")
    assert (similar.source, similar.seconds) == ("measured", seconds) and "other suspects" in similar.text()
    other = expected_time(store, "finetune", "quick", {"steps": 4}, badnets, "demo:badnets", 100, "cpu")
    assert other.source == "estimated"  # other parameters: not the same run
    assert budget_passes("finetune", {"steps": 4, "batch_size": 64}, 80, 20) > budget_passes("finetune", {"steps": 2, "batch_size": 64}, 80, 20)
    dbd = expected_time(store, "dbd", "quick", None, badnets, "demo:badnets", 100, "cpu")
    assert dbd.source == "estimated" and dbd.seconds > 0  # a training-time defense: counted from its training set
