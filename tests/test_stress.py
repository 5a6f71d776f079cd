"""Stress test (the retuning attack of Min et al., NeurIPS 2024) on the real demo suspects, with small budgets."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import defenses.stress as stress
import suspects
from backdoor_lens.cli import main
from defenses.base import ParamError
from defenses.registry import list_defenses
from defenses.stress import clean_reference, retune_set, stress_test, verdict
from runs.compare import format_table, runs_table
from runs.jobs import run_queued
from runs.report import _stress_html
from runs.store import RunStore
from runs.stress import STRESS_FILE, latest_stress_job, load_stress, run_stress, submit_stress

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"epochs": 2, "pool_size": 120, "test_limit": 300, "batch_size": 64}


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.float().contiguous()}


def test_poisoned_samples_come_from_the_pool_only(badnets, monkeypatch):
    """A spy on the training loop: every re-tuning image is a pool image or a triggered pool image; none is a test
    image; exactly n_poison of each epoch's images carry the trigger."""
    seen: list[torch.Tensor] = []
    real_fit = stress.fit

    def spy_fit(model, batches, loss_fn, opt, **kw):
        def recorded(epoch):
            for b in batches(epoch):
                seen.append(b[0].detach().cpu())
                yield b
        return real_fit(model, recorded, loss_fn, opt, **kw)

    monkeypatch.setattr(stress, "fit", spy_fit)
    out = stress_test(badnets, None, {**SMALL, "n_poison": 5})
    assert seen, "the training loop was never called"
    pool_x = badnets.defense_pool.images()
    pool, triggered = _rows(pool_x), _rows(badnets.trigger(pool_x))
    test = _rows(badnets.test.images())
    trained = torch.cat(seen)
    assert len(trained) == SMALL["epochs"] * SMALL["pool_size"]
    n_trig = 0
    for r in trained.float().contiguous():
        key = r.numpy().tobytes()
        assert key not in test
        assert key in pool or key in triggered
        n_trig += key in triggered and key not in pool
    assert n_trig == 5 * SMALL["epochs"]
    assert out["retune_set"] == {"images": SMALL["pool_size"], "poisoned": 5, "from": "defense pool"}
    assert out["verdict"] == "no reference" and out["reference_asr_after_retune"] is None


def test_retune_set_relabels_only_the_poisoned(badnets):
    from defenses.runner import defense_pool

    pool = defense_pool(badnets, 100, val_fraction=0.0)
    data = retune_set(pool, badnets.trigger, 7, seed=3)
    assert int(data.poisoned.sum()) == 7 and len(data) == 100
    target = badnets.trigger.target
    assert (data.y[data.poisoned] == target).all()
    assert (pool.y[data.poisoned] != target).all()  # all-to-one: non-target images carry the trigger
    assert torch.equal(data.y[~data.poisoned], pool.y[~data.poisoned])
    assert torch.equal(data.x[~data.poisoned], pool.x[~data.poisoned])
    assert not torch.equal(data.x[data.poisoned], pool.x[data.poisoned])
    with pytest.raises(ParamError, match="n_poison"):
        retune_set(pool, badnets.trigger, 1000)


def test_badnets_is_superficial_against_the_clean_reference(badnets):
    """The backdoored suspect keeps its ASR after re-tuning; the clean model re-tuned on the same set does not
    acquire it from 5 poisoned samples."""
    out = stress_test(badnets, suspects.load("demo:clean"), SMALL, reference_ref="demo:clean")
    assert out["asr"] > 0.9 and out["asr_after_retune"] > 0.8
    assert out["reference_asr"] < 0.2 and out["reference_asr_after_retune"] < 0.3
    assert out["verdict"] == "superficial"
    for key in ("asr", "ba", "asr_after_retune", "ba_after_retune", "reference_asr_after_retune", "verdict",
                "seconds"):
        assert key in out
    assert out["n_clean"] == SMALL["test_limit"]


def test_verdict_and_reference_rules(badnets):
    assert verdict(0.10, 0.08, 0.05) == "robust"
    assert verdict(0.20, 0.08, 0.05) == "superficial"
    assert verdict(0.20, None, 0.05) == "no reference"
    assert clean_reference("demo:badnets", badnets.card) == "demo:clean"
    repaired = copy.deepcopy(badnets.card)
    repaired["provenance"] = {"source": "defense", "defense": "finetune", "parent": "demo:badnets"}
    assert clean_reference("/somewhere/run", repaired) == "demo:clean"
    assert clean_reference("/somewhere/model", {"provenance": {"source": "backdoor-lens train"}}) is None
    assert clean_reference("/x", {"provenance": {"clean_reference": "/models/clean"}}) == "/models/clean"
    assert "stress" not in list_defenses()
    with pytest.raises(ParamError):
        stress_test(badnets, None, {"n_poison": 0})


def _fake_run(store: RunStore, parent: str = "demo:badnets") -> str:
    """A finished run whose 'repaired' model is the parent unchanged (cheap; the test is about the plumbing)."""
    s = suspects.load(parent)
    card = copy.deepcopy(s.card)
    card["provenance"] = {"source": "defense", "defense": "finetune", "parent": parent}
    rid = store.create("finetune", parent, "quick", {}, 500, 0)
    store.finish(rid, {"defense": "finetune", "preset": "quick", "ba": 0.9, "asr": 1.0, "ra": 0.0, "der": 0.5,
                       "ba_before": 0.9, "asr_before": 1.0, "ra_before": 0.0, "device": "cpu", "seconds": 1.0, "pool_size": 500, "pool_split": {"train": 400, "held_out": 100},
                       "finished": "2026-01-01T00:00:00+00:00"},
                 suspects.Suspect(s.model, card, None))
    return rid


def test_stress_job_is_stored_with_the_run(runs_dir):
    store = RunStore(runs_dir)
    rid = _fake_run(store)
    with pytest.raises(ValueError):
        submit_stress(store, "no-such-run", start_worker=False)
    job = submit_stress(store, rid, {**SMALL, "epochs": 1}, start_worker=False)
    assert latest_stress_job(store, rid).status == "queued"
    assert run_queued(store) == 1  # the worker loop takes stress jobs after the defense runs
    rec = latest_stress_job(store, rid)
    assert rec.id == job and rec.status == "finished", rec.error
    stored = load_stress(store.get(rid).run_dir)
    assert stored["verdict"] == rec.result["verdict"] == "superficial"
    assert stored["reference"] == "demo:clean" and stored["run_id"] == rid
    table = runs_table(store, "demo:badnets")
    assert table.loc[0, "asr_after_retune"] == pytest.approx(stored["asr_after_retune"])
    assert "ASR re-tuned" in format_table(table)
    assert "superficial" in _stress_html(table)


def test_demo_clean_borrows_a_trigger_and_is_its_own_reference():
    out = run_stress("demo:clean", None, SMALL)
    assert out["trigger_from"] == "demo:badnets" and out["reference_is_suspect"]
    assert out["reference_asr_after_retune"] == out["asr_after_retune"]
    assert out["verdict"] == "robust"


def test_cli_json_and_bad_input(runs_dir, capsys):
    store = RunStore(runs_dir)
    rid = _fake_run(store)
    args = ["stress", rid, "--json", "--runs", str(runs_dir), "--reference", "none"]
    for k, v in {**SMALL, "epochs": 1}.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("asr", "ba", "asr_after_retune", "ba_after_retune", "reference_asr_after_retune", "verdict",
                "seconds"):
        assert key in out
    assert out["verdict"] == "no reference"
    assert (runs_dir / rid / STRESS_FILE).is_file()
    assert main(["stress", "demo:nope", "--runs", str(runs_dir)]) == 2
    assert "no demo suspect" in capsys.readouterr().err
    assert main(["stress", "demo:badnets", "--set", "n_poison=0", "--runs", str(runs_dir)]) == 2
    assert "n_poison" in capsys.readouterr().err
