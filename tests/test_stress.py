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

SMALL = {"epochs": 2, "pool_size": 120, "test_limit": 300, "batch_size": 64, "seeds": 1}


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.float().contiguous()}


def _spy(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real_fit = stress.fit

    def spy_fit(model, batches, loss_fn, opt, **kw):
        def recorded(epoch):
            for b in batches(epoch):
                seen.append(b[0].detach().cpu())
                yield b
        return real_fit(model, recorded, loss_fn, opt, **kw)

    monkeypatch.setattr(stress, "fit", spy_fit)
    return seen


def test_poisoned_samples_come_from_the_attacks_poisoned_training_set(badnets, monkeypatch):
    """A spy on the training loop: every re-tuning image is a defense-pool image or one of the attack's own poisoned
    training images (the official protocol); none is a test image; exactly n_poison of each epoch's images are
    poisoned ones, and they replace clean images (the set keeps its size)."""
    seen = _spy(monkeypatch)
    out = stress_test(badnets, None, {**SMALL, "n_poison": 5, "augment": "none"})
    assert seen, "the training loop was never called"
    pool = _rows(badnets.defense_pool.images())
    attack = badnets.poisoned_train()
    poisoned = _rows(attack.trigger(attack.base.images(attack.poison_idx)))
    test = _rows(badnets.test.images())
    trained = torch.cat(seen)
    assert len(trained) == SMALL["epochs"] * SMALL["pool_size"]
    n_trig = 0
    for r in trained.float().contiguous():
        key = r.numpy().tobytes()
        assert key not in test
        assert key in pool or key in poisoned
        n_trig += key in poisoned
    assert n_trig == 5 * SMALL["epochs"]
    assert out["retune_set"]["from"] == "the attack's poisoned training set"
    assert (out["retune_set"]["images"], out["retune_set"]["poisoned"]) == (SMALL["pool_size"], 5)
    assert out["verdict"] == "not repaired" and out["reference_asr_after_retune"] is None
    # the former source: the trigger applied to pool images
    seen.clear()
    out = stress_test(badnets, None, {**SMALL, "epochs": 1, "poison_source": "pool", "augment": "none"})
    triggered = _rows(badnets.trigger(badnets.defense_pool.images()))
    keys = [r.numpy().tobytes() for r in torch.cat(seen).float().contiguous()]
    assert sum(k in triggered and k not in pool for k in keys) == 5 and all(k in pool or k in triggered for k in keys)
    assert out["retune_set"]["from"] == "defense pool, trigger applied"


def test_clean_images_are_augmented_once_as_the_official_script(badnets, monkeypatch):
    """augment='auto' is the suspect's training augmentation (demo: random crop); drawn once, every epoch sees the
    same augmented copies; the poisoned samples are never augmented."""
    seen = _spy(monkeypatch)
    out = stress_test(badnets, None, {**SMALL, "epochs": 2})
    assert out["retune_set"]["augment"] == "crop" and out["retune_set"]["augment_drawn"] == "once"
    per_epoch = len(seen) // 2
    first, second = torch.cat(seen[:per_epoch]), torch.cat(seen[per_epoch:])
    assert _rows(first) == _rows(second)  # the same images in both epochs (shuffled)
    pool = _rows(badnets.defense_pool.images())
    assert len(_rows(first) - pool) > 100  # cropped: most are no longer pool images
    seen.clear()
    stress_test(badnets, None, {**SMALL, "epochs": 2, "augment_per_epoch": True})
    per_epoch = len(seen) // 2
    assert _rows(torch.cat(seen[:per_epoch])) != _rows(torch.cat(seen[per_epoch:]))


def test_retune_set_replaces_clean_images_with_poisoned_ones(badnets):
    from defenses.runner import defense_pool

    pool = defense_pool(badnets, 100, val_fraction=0.0)
    data = retune_set(pool, badnets.trigger, 7, seed=3, attack_set=badnets.poisoned_train())
    assert int(data.poisoned.sum()) == 7 and len(data) == 100 and data.origin == "attack"
    target = badnets.trigger.target
    assert (data.y[data.poisoned] == target).all()
    assert torch.equal(data.x[~data.poisoned], pool.x[:93]) and torch.equal(data.y[~data.poisoned], pool.y[:93])
    assert set(data.source[data.poisoned].tolist()) <= set(badnets.poisoned_train().poison_idx.tolist())
    old = retune_set(pool, badnets.trigger, 7, seed=3)
    assert old.origin == "pool" and (old.y[old.poisoned] == target).all()
    assert (pool.y[old.poisoned] != target).all()  # all-to-one: non-target images carry the trigger
    assert torch.equal(old.x[~old.poisoned], pool.x[~old.poisoned])
    with pytest.raises(ParamError, match="n_poison"):
        retune_set(pool, badnets.trigger, 1000)


def test_retune_trains_every_weight_even_of_a_model_left_frozen(badnets):
    """A defense may leave its weights frozen (NPD froze them all: the stress test then had nothing to optimise);
    the protocol re-tunes all weights, and a run's repaired model is a plain trainable model."""
    import copy

    from defenses.runner import defense_pool
    from defenses.stress import retune, stress_params

    pool = defense_pool(badnets, 64, val_fraction=0.0)
    data = retune_set(pool, badnets.trigger, 2, seed=0)
    model = copy.deepcopy(badnets.model)
    for q in model.parameters():
        q.requires_grad_(False)
    before = [q.detach().clone() for q in model.parameters()]
    params = stress_params("official", {"epochs": 1, "batch_size": 32, "augment": "none"})
    retune(model, data, params, torch.device("cpu"), seed=0)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


def test_unrepaired_badnets_is_not_repaired_with_spread_over_seeds(badnets):
    """The backdoored suspect was never repaired (ASR before re-tuning ~1.0); the clean model re-tuned on the same
    sets does not acquire the backdoor from 5 poisoned samples; three seeds give a spread."""
    out = stress_test(badnets, suspects.load("demo:clean"), {**SMALL, "seeds": 3}, reference_ref="demo:clean")
    assert out["asr"] > 0.9 and out["asr_after_retune"] > 0.8
    assert out["reference_asr"] < 0.2 and out["reference_asr_after_retune"] < 0.3
    assert out["verdict"] == "not repaired" and "never removed" in out["verdict_reason"]
    sp = out["spread"]["reference_asr_after_retune"]
    assert len(sp["values"]) == 3 and sp["min"] <= sp["mean"] <= sp["max"] and out["seeds"] == [0, 1, 2]
    assert sp["mean"] == pytest.approx(sum(sp["values"]) / 3)
    for key in ("asr", "ba", "asr_after_retune", "ba_after_retune", "reference_asr_after_retune", "verdict",
                "seconds", "params"):
        assert key in out
    assert out["n_clean"] == SMALL["test_limit"]


def test_official_protocol_is_the_default():
    p = stress.stress_params()
    assert (p.pool_size, p.n_poison, p.weight_decay, p.epochs, p.lr, p.momentum, p.batch_size, p.seeds) == \
        (1000, 5, 0.0, 5, 0.01, 0.9, 128, 3)
    assert (p.poison_source, p.augment, p.augment_per_epoch) == ("auto", "auto", False)
    assert stress.preset_of(p) == "official"
    v1 = stress.stress_params("lens-v1")
    assert (v1.pool_size, v1.weight_decay, v1.augment, v1.seeds, v1.poison_source) == (500, 5e-4, "none", 1, "pool")
    assert stress.preset_of(v1) == "lens-v1" and stress.preset_of(stress.stress_params(overrides={"lr": 0.1})) == \
        "custom"
    with pytest.raises(ParamError, match="preset"):
        stress.stress_params("nope")


def test_verdict_and_reference_rules(badnets):
    p = stress.StressParams()
    assert verdict(0.02, 0.10, 0.08, p)[0] == "robust"
    assert verdict(0.02, 0.30, 0.08, p)[0] == "superficial"
    assert verdict(0.95, 0.99, 0.08, p)[0] == "not repaired"
    assert verdict(0.02, 0.30, 0.08, p, ba_before=0.9, ba_after=0.5)[0] == "inconclusive"  # BA collapsed
    assert verdict(0.02, 0.30, 0.08, p, n_asr_images=20)[0] == "inconclusive"  # too few images
    assert verdict(0.02, 0.30, None, p)[0] == "no reference"
    strict = stress.StressParams(tolerance=0.0, not_repaired_asr=0.01)
    assert verdict(0.02, 0.10, 0.08, strict)[0] == "not repaired"
    assert verdict(0.005, 0.10, 0.08, strict)[0] == "superficial"
    assert clean_reference("demo:badnets", badnets.card) == "demo:clean"
    repaired = copy.deepcopy(badnets.card)
    repaired["provenance"] = {"source": "defense", "defense": "finetune", "parent": "demo:badnets"}
    assert clean_reference("/somewhere/run", repaired) == "demo:clean"
    assert clean_reference("/somewhere/model", {"provenance": {"source": "backdoor-lens train"}}) is None
    assert clean_reference("/x", {"provenance": {"clean_reference": "/models/clean"}}) == "/models/clean"
    assert "stress" not in list_defenses()
    with pytest.raises(ParamError):
        stress_test(badnets, None, {"n_poison": 0})


def test_collapsed_ba_is_inconclusive():
    """demo:clean re-tuned at a huge learning rate loses its BA: the ASR it then shows means nothing."""
    out = run_stress("demo:clean", None, {**SMALL, "lr": 0.9, "momentum": 0.0})
    assert out["ba"] - out["ba_after_retune"] > 0.1
    assert out["verdict"] == "inconclusive" and "BA" in out["verdict_reason"]


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
    assert stored["verdict"] == rec.result["verdict"] == "not repaired"  # the "repaired" model is the parent
    assert stored["reference"] == "demo:clean" and stored["run_id"] == rid
    table = runs_table(store, "demo:badnets")
    assert table.loc[0, "asr_after_retune"] == pytest.approx(stored["asr_after_retune"])
    assert "ASR re-tuned" in format_table(table)
    assert "not repaired" in _stress_html(table)


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
                "seconds", "params"):
        assert key in out
    assert out["verdict"] == "not repaired" and out["reference_asr_after_retune"] is None
    official = stress.StressParams()
    assert {k: v for k, v in out["params"].items() if k not in SMALL and k != "epochs"} == \
        {k: v for k, v in vars(official).items() if k not in SMALL and k != "epochs"}  # official values by default
    assert (runs_dir / rid / STRESS_FILE).is_file()
    assert main(["stress", "demo:nope", "--runs", str(runs_dir)]) == 2
    assert "no demo suspect" in capsys.readouterr().err
    assert main(["stress", "demo:badnets", "--set", "n_poison=0", "--runs", str(runs_dir)]) == 2
    assert "n_poison" in capsys.readouterr().err
    assert main(["stress", "demo:badnets", "--set", "poison_source=bogus", "--runs", str(runs_dir)]) == 2
    assert "poison_source" in capsys.readouterr().err


def test_demo_suspect_by_name_or_folder_gives_the_same_result(runs_dir, capsys):
    """``demo:badnets`` and its bundle folder are one model: the same clean reference (demo:clean), the same numbers."""
    from suspects.store import demo_suspect_path

    tiny = {**SMALL, "epochs": 1, "pool_size": 60, "test_limit": 150, "min_asr_images": 50}
    results = []
    for target in ("demo:badnets", str(demo_suspect_path("badnets"))):
        args = ["stress", target, "--json", "--runs", str(runs_dir)]
        for k, v in tiny.items():
            args += ["--set", f"{k}={v}"]
        assert main(args) == 0
        results.append(json.loads(capsys.readouterr().out))
    a, b = results
    assert a["reference"] == b["reference"] == "demo:clean"
    for key in ("asr", "asr_after_retune", "reference_asr_after_retune", "verdict"):
        assert a[key] == b[key], key
    assert a["verdict"] == "not repaired" and a["reference_asr_after_retune"] is not None


def _stress_doc():
    from scripts import stress_doc

    return stress_doc


def test_stress_doc_regenerates_from_its_store():
    """docs/stress.md is exactly what scripts/stress_doc.py renders from docs/stress-grid.json; every post-training
    defense of the registry appears for every demo attack, measured or said to be not yet measured."""
    doc = _stress_doc()
    store = doc.load_store()
    text = doc.render(store)
    assert doc.DOC.read_text() == text, "docs/stress.md is stale: run python scripts/stress_doc.py"
    defenses, attacks = doc.grid()
    assert "dbd" not in defenses and {"finetune", "fst", "sau", "anp"} <= set(defenses)
    assert attacks and "clean" not in attacks
    for attack in attacks:
        section = text.split(f"### {attack}\n")[1].split("\n### ")[0]
        for d in defenses:
            row = next(r for r in section.splitlines() if r.startswith(f"| {d} ") or r.startswith(f"| {d}("))
            state = doc.cell_state(store, d, attack)
            assert ("not yet" in row) == (state != "measured"), row
    empty = doc.render({"cells": {}, "reference_cache": {}})
    assert f"0 of {len(defenses) * len(attacks)} cells measured" in empty
    assert empty.count("| not yet measured |") == len(defenses) * len(attacks)


def test_stress_page_names_the_machine_of_each_cell_and_marks_older_ones():
    doc = _stress_doc()
    machine = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "torch": "2.14.1", "threads": 2}
    new = {"measured": "2026-12-07", "machine": machine, "stress": {"device": "cpu (2 threads)"}}
    old = {"measured": "2026-12-06", "stress": {"device": "cpu (1 threads)"}}
    text = doc.measured_on_text([new, new, old])
    assert text.startswith("2026-12-07 on AMD EPYC, AVX2, torch 2.14.1, 2 threads (2 cells")
    assert "2026-12-06 on cpu (1 threads) (1 cells measured before cells recorded their machine" in text
    assert "before cells recorded" not in doc.measured_on_text([new])
