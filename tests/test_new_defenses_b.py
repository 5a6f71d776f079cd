"""RNP and NPD (issue 31): each step runs on the demo model with a tiny budget, RNP's threshold comes from the
held-out pool, NPD's polarizer folds exactly into the network (and the repaired model saves and loads), both cancel
inside their loops and run with the suspect's test split sealed."""

from __future__ import annotations

import copy

import pytest
import torch

import suspects
from defenses import Cancelled, RepairContext, get_defense, list_defenses, run_defense
from defenses.npd import Polarizer, conv_bn_pairs, fold, fold_error, targeted_l2_attack
from defenses.runner import defense_pool
from suspects.device import prepare_model
from suspects.store import without_test_split

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "rnp": {"max_images": 64, "batch_size": 32, "unlearn_epochs": 2, "recover_epochs": 2},
    "npd": {"warmup_steps": 2, "steps": 3, "batch_size": 16},
}


@pytest.fixture(scope="module")
def badnets():
    s = suspects.load("demo:badnets")
    s.model = prepare_model(s.model, "cpu")
    return s


def _repair(suspect, name: str, overrides: dict, stop=lambda: False, ticks: list | None = None, pool: int = 100):
    defense = get_defense(name)
    params = defense.make_params("quick", overrides)
    model = prepare_model(copy.deepcopy(suspect.model), "cpu").eval()
    ctx = RepairContext(suspect, defense_pool(suspect, pool, seed=0), torch.device("cpu"), seed=0,
                        progress=lambda f, m, d: ticks.append((f, m, d)) if ticks is not None else None,
                        should_stop=stop, poll_interval=0.0)
    return defense.repair(model, params, ctx), model


def _zero_bn_channels(model: torch.nn.Module) -> int:
    return sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_both_are_registered_with_both_presets():
    names = list_defenses()
    for name in ("rnp", "npd"):
        assert name in names
        d = get_defense(name)
        assert "arXiv" in d.paper and {"quick", "paper"} <= set(d.presets) and "batchnorm" in d.needs
        assert d.make_params("paper") == d.Params()  # the paper preset is the official defaults


def test_rnp_unlearns_recovers_and_takes_the_largest_threshold_within_the_held_out_tolerance(badnets):
    ticks: list = []
    out, _ = _repair(badnets, "rnp", TINY["rnp"], ticks=ticks)
    a, curves = out.artifacts, out.curves
    assert 1 <= a["unlearning_epochs"] <= 2 and len(curves["recovering"]) == 2 and a["images_used"] == 64
    assert [r["threshold"] for r in curves["threshold_curve"]] == [round(0.05 * i, 2) for i in range(19)]
    within = [r["threshold"] for r in curves["threshold_curve"]
              if a["held_out_ba_before"] - r["held_out_ba"] <= 0.05]  # quick's ba_tolerance
    assert a["threshold"] == (max(within) if within else None)
    # the original model is pruned: exactly the reported channels have a zero BN weight (none had one before)
    assert _zero_bn_channels(badnets.model) == 0 and _zero_bn_channels(out.model) == a["n_pruned"]
    assert sum(a["mask_histogram"]) == a["n_neurons"] == 848
    assert ticks[-1][0] == pytest.approx(1.0) and all(0 <= f <= 1 for f, _, _ in ticks)


def test_rnp_fixed_threshold_prunes_every_channel_at_or_below_it(badnets):
    out, _ = _repair(badnets, "rnp", {**TINY["rnp"], "auto_threshold": False, "threshold": 1.0})
    assert out.artifacts["n_pruned"] == out.artifacts["n_neurons"]  # every mask lies in [0, 1]
    assert _zero_bn_channels(out.model) == out.artifacts["n_neurons"]


def test_npd_fold_is_exact_on_a_conv_feeding_only_its_batchnorm(badnets):
    x = badnets.defense_pool.images(torch.arange(8))
    pairs = conv_bn_pairs(badnets.model, x)
    assert pairs[-1] == ("layer4.1.conv1", "layer4.1.bn2")
    assert fold_error(badnets.model, "layer4.1.conv1", "layer4.1.bn2", x) < 1e-5
    # the stem's output also feeds the first block's skip: folding the shift into layer1.0.bn1 would be wrong
    assert ("conv1", "layer1.0.bn1") in pairs and fold_error(badnets.model, "conv1", "layer1.0.bn1", x) > 1e-2
    with pytest.raises(ValueError, match="cannot be folded"):
        _repair(badnets, "npd", {**TINY["npd"], "layer": "conv1"})
    with pytest.raises(ValueError, match="not a convolution feeding"):
        _repair(badnets, "npd", {**TINY["npd"], "layer": "fc"})
    pol = Polarizer(16)  # identity at initialisation (eval mode): folding it changes nothing
    model = copy.deepcopy(badnets.model)
    fold(model, "layer1.0.conv1", "layer1.0.bn2", pol.eval())
    with torch.no_grad():
        assert torch.allclose(model(x), badnets.model(x), atol=1e-4)


def test_npd_trains_the_polarizer_folds_it_and_the_repaired_model_saves_and_loads(badnets, tmp_path):
    report = run_defense("npd", badnets, "quick", TINY["npd"], pool_size=100, measure="subset:50")
    a = report["artifacts"]
    assert a["layer"] == "layer4.1.conv1" and a["fold_error"] < 1e-4
    assert a["polarizer_distance_from_identity"] > 0  # it trained (the warm-up BN statistics alone move it)
    repaired = report.suspect.model
    assert repaired.state_dict().keys() == badnets.model.state_dict().keys()  # the architecture is unchanged
    assert all(q.requires_grad for q in repaired.parameters())  # NPD freezes them; the result is a plain model
    folder = suspects.save(report.suspect, tmp_path / "npd")
    loaded = suspects.load(folder)
    x = badnets.defense_pool.images(torch.arange(16))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), repaired.eval()(x), atol=1e-5)
        assert not torch.allclose(loaded.model(x), badnets.model(x), atol=1e-3)


def test_npd_targeted_attack_stays_in_its_l2_ball(badnets):
    x = badnets.defense_pool.images(torch.arange(12))
    target = torch.full((12,), 3)
    delta = targeted_l2_attack(badnets.model, x, target, radius=1.5, step=0.1, steps=2)
    assert delta.abs().sum() > 0 and float(delta.flatten(1).norm(dim=1).max()) <= 1.5 + 1e-4


@pytest.mark.parametrize("name", ["rnp", "npd"])
def test_cancels_inside_the_training_loop(badnets, name):
    """should_stop turns true on its third poll, before any epoch ends: Cancelled, no tick, the suspect untouched."""
    state = {k: v.clone() for k, v in badnets.model.state_dict().items()}
    polls: list = []
    ticks: list = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) >= 3

    overrides = {**TINY[name], "batch_size": 8, **({"warmup_steps": 6} if name == "npd" else {})}
    with pytest.raises(Cancelled):
        _repair(badnets, name, overrides, stop=stop, ticks=ticks)
    assert ticks == [] and len(polls) == 3
    assert all(torch.equal(v, badnets.model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("name", ["rnp", "npd"])
def test_runs_with_the_test_split_sealed(badnets, name):
    sealed = without_test_split(badnets)
    out, _ = _repair(sealed, name, {**TINY[name], "batch_size": 32} if name == "npd" else TINY[name], pool=60)
    assert out.model is not None and out.artifacts["held_out_ba_after"] >= 0
