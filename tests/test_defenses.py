"""Each defense on a demo suspect with a reduced budget lowers ASR; parameters are validated before running."""

import json

import pytest

import suspects
from defenses import ParamError, get_defense, list_defenses, run_defense
from defenses.base import param_specs

# Small budgets: enough to show each method's effect on the demo BadNets suspect in seconds on a CPU.
REDUCED = {
    "finetune": {"steps": 20},
    "fineprune": {"steps": 12},
    "shortcut": {"steps": 12, "block": "layer4.1"},  # the auto rule picks layer1.1 on the v2 demo: ASR stays ~0.99
    "linf_prune": {},
    "anp": {"iterations": 60},
    "awm": {"outer": 3, "steps": 2},
}


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


def test_registry_lists_the_six_post_training_defenses():
    names = list_defenses()
    six = ["shortcut", "linf_prune", "awm", "anp", "fineprune", "finetune"]
    assert names[:4] == six[:4]  # the seed papers' methods first, then the baselines (in this order)
    assert [n for n in names if n in six] == six
    for name in list_defenses():
        d = get_defense(name)
        assert d.title and d.paper and d.summary and {"quick", "paper"} <= set(d.presets)
        assert d.make_params("paper") is not None and d.make_params("quick") is not None
        for spec in param_specs(d.Params):
            assert spec["help"], (name, spec["name"])


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_defense_lowers_asr_on_badnets(badnets, name):
    report = run_defense(name, badnets, "quick", REDUCED[name], pool_size=300, suspect_ref="demo:badnets")
    assert report["asr_before"] > 0.95
    assert report["asr"] < report["asr_before"] - 0.05, report
    assert report["ba"] > 0.5
    for key in ("ba_before", "asr_before", "ba", "asr", "ra", "der", "seconds", "device"):
        assert report[key] is not None
    assert 0.0 <= report["der"] <= 1.0
    json.dumps({k: v for k, v in report.items()}, default=str)  # the report is JSON-able
    assert report.suspect.card["provenance"]["defense"] == name
    # the repaired model is a new object: the suspect itself is untouched
    assert suspects.evaluate(badnets.model, badnets.test, badnets.trigger, limit=400).asr > 0.95


def test_shortcut_records_the_suppressed_block(badnets, tmp_path):
    report = run_defense("shortcut", badnets, "quick", {"steps": 2, "block": "layer4.1"}, pool_size=100)
    assert report["artifacts"]["block"] == "layer4.1"
    from suspects.models import list_residual_blocks

    last = run_defense("shortcut", badnets, "quick", {"steps": 0, "block": "last"}, pool_size=100)
    assert last["artifacts"]["block"] == list_residual_blocks(badnets.model)[-1] == "layer4.1"
    folder = suspects.save(report.suspect, tmp_path / "r")
    assert suspects.load(folder).card["skip_gammas"] == {"layer4.1": 0.0}


def test_awm_one_shot_runs(badnets):
    report = run_defense("awm", badnets, "one-shot", {"outer": 2, "steps": 1}, pool_size=200)
    assert report["artifacts"]["images_used"] == 100 and report["artifacts"]["one_shot"] is True


@pytest.mark.parametrize("name,overrides,message", [
    ("finetune", {"steps": 0}, "'steps' must lie in"),
    ("finetune", {"lr": -1}, "'lr' must lie in"),
    ("finetune", {"lr": "fast"}, "'lr' must be a number"),
    ("anp", {"eps": float("nan")}, "'eps' must be finite"),
    ("awm", {"alpha": 1.5}, "'alpha' must lie in"),
    ("linf_prune", {"norm": "l7"}, "'norm' must be one of"),
    ("fineprune", {"bogus": 1}, "unknown parameter"),
    ("finetune", {"steps": 2.5}, "whole number"),
])
def test_nonsense_parameters_are_refused_before_running(badnets, name, overrides, message):
    with pytest.raises(ParamError, match=message):
        run_defense(name, badnets, "quick", overrides)


def test_pool_size_and_preset_validation(badnets):
    with pytest.raises(ParamError, match="exceeds"):
        run_defense("finetune", badnets, "quick", pool_size=10**6)
    with pytest.raises(ParamError, match="unknown preset"):
        run_defense("finetune", badnets, "turbo")
    with pytest.raises(ValueError, match="unknown defense"):
        run_defense("magic", badnets)


def test_defenses_needing_a_trigger_refuse_a_suspect_without_one():
    clean = suspects.load("demo:clean")
    with pytest.raises(ValueError, match="needs a trigger"):
        run_defense("linf_prune", clean)


def test_shortcut_needs_a_trigger_only_to_choose_its_block():
    """block='auto' (the paper preset) runs the skip ablation on triggered pool images; a named or the last block
    (the quick preset) needs no trigger, so a suspect without one (a model under review) can still be repaired."""
    clean = suspects.load("demo:clean")
    shortcut = get_defense("shortcut")
    assert not shortcut.threat.trigger and "block='auto'" in shortcut.threat.describe()
    with pytest.raises(ValueError, match="needs a trigger .*name a block"):
        run_defense("shortcut", clean, "paper", pool_size=100)
    report = run_defense("shortcut", clean, "quick", {"steps": 0}, pool_size=100)
    assert report["artifacts"]["block"] == "layer4.1" and report["asr"] is None and report["ba"] > 0.8


def test_defense_pool_never_overlaps_test_and_is_never_poisoned(badnets):
    rest, pool = badnets.split
    poisoned = set(badnets.poisoned_train().poison_idx.tolist())
    assert not poisoned & set(pool.tolist())
    assert badnets.card["data"] == {"name": "demo"}  # train and test are different splits of the bundle


def test_odd_batches_train_on_the_cpu_without_crashing():
    """torch's CPU channels-last backward of a strided 1x1 conv with < 16 input channels corrupts memory for odd
    batch sizes (the 8 -> 16 shortcut of the width-8 demo models); prepare_model keeps that conv in the standard
    format. Run in a child process so a crash fails this test instead of killing the session."""
    import subprocess
    import sys

    code = ("import copy, torch, torch.nn.functional as F, suspects\n"
            "from defenses import run_defense\n"
            "from suspects.device import prepare_model, to_device\n"
            "s = suspects.load('demo:badnets')\n"
            "m = prepare_model(copy.deepcopy(s.model), 'cpu').train()\n"
            "for n in (3, 7):\n"
            "    F.cross_entropy(m(to_device(s.test.images(torch.arange(n)), 'cpu')), s.test.labels[:n]).backward()\n"
            "for n in (3, 5):\n"
            "    r = run_defense('finetune', s, 'quick', {'steps': 4}, pool_size=n)\n"
            "    assert r['pool_split']['train'] == n, r['pool_split']\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])
