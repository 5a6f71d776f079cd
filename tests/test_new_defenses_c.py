"""ABL and BTI-DBF (issue 31): each step on demo images with tiny budgets, the whole pipeline through the runner,
cancellation, and the sealed test split."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import suspects
from defenses import Cancelled, RepairContext, get_defense, run_defense
from defenses.abl import ABLParams, abl_loss, isolate, isolation_losses, train_isolation, unlearn
from defenses.btidbf import (
    BTIDBFParams,
    UNetGenerator,
    benign_mask,
    decouple,
    detect_target,
    features,
    head_from_features,
    pretrain_generator,
    unlearn_with_generator,
)
from defenses.common import pool_asr
from defenses.retrain import TrainingSet, poisoned_training_set, reinitialize, split_quality
from defenses.runner import defense_pool
from suspects.device import prepare_model
from suspects.store import without_test_split

TINY_ABL = {"subset": 300, "isolation_epochs": 1, "finetune_epochs": 1, "unlearning_epochs": 1,
            "isolation_ratio": 0.05, "batch_size": 64}
TINY_BTI = {"preround": 1, "nround": 2, "mround": 1, "uround": 1, "ul_round": 1, "gen_filters": 4, "gen_blocks": 2,
            "batch_size": 64}
TINY = {"abl": TINY_ABL, "btidbf": TINY_BTI}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def badnets():
    s = suspects.load("demo:badnets")
    s.model = prepare_model(s.model, "cpu")
    return s


@pytest.fixture(scope="module")
def pool(badnets):
    return defense_pool(badnets, 200)


@pytest.fixture(scope="module")
def small_set(badnets, pool) -> TrainingSet:
    """400 poisoned-training-set images of the BadNets demo (about 10% poisoned)."""
    return poisoned_training_set(badnets, pool, subset=400, seed=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- ABL ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lga", "flooding"])
def test_abl_loss_descends_above_gamma_and_ascends_below(kind):
    for value, sign in ((0.8, 1.0), (0.2, -1.0)):
        ce = torch.tensor(value, requires_grad=True)
        loss = abl_loss(ce, kind, 0.5)
        loss.backward()
        assert float(ce.grad) == pytest.approx(sign)
    assert float(abl_loss(torch.tensor(0.2), "lga", 0.5)) == pytest.approx(-0.2)
    assert float(abl_loss(torch.tensor(0.2), "flooding", 0.5)) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown ABL loss"):
        abl_loss(torch.tensor(0.2), "sgd", 0.5)


def test_isolate_takes_the_lowest_losses():
    losses = torch.tensor([0.9, 0.1, 0.5, 0.05, 2.0, 0.3, 0.7, 1.1])
    assert torch.nonzero(isolate(losses, 0.25)).flatten().tolist() == [1, 3]
    assert int(isolate(losses, 0.01).sum()) == 1  # at least one sample


def test_a_backdoored_model_gives_the_poisoned_samples_the_lowest_losses(badnets, small_set):
    """ABL's premise: under a model that learned the backdoor, the poisoned samples end with the lowest losses (here
    the demo suspect itself stands in for a converged isolation model)."""
    losses = isolation_losses(badnets.model, small_set.x, small_set.y, "cpu")
    q = split_quality(isolate(losses, 0.05), small_set.poisoned)
    assert q["precision"] > 2 * small_set.poison_rate, q


def test_isolation_stage_trains_a_fresh_model(badnets, small_set):
    torch.manual_seed(0)
    model = reinitialize(copy.deepcopy(badnets.model))
    seen = []
    part = TrainingSet(small_set.x[:200], small_set.y[:200], small_set.poisoned[:200], small_set.index[:200])
    p = ABLParams(isolation_epochs=2, batch_size=100)
    losses = train_isolation(model, part, "cpu", p, _gen(), tick=lambda f, m: seen.append(f))
    assert len(losses) == 2 and losses[1] < losses[0] and seen[-1] == pytest.approx(1.0)


def test_unlearning_ascends_on_the_isolated_samples_and_weakens_the_backdoor(badnets, small_set, pool):
    model = copy.deepcopy(badnets.model)
    x_b, y_b = small_set.x[small_set.poisoned], small_set.y[small_set.poisoned]
    before = float(isolation_losses(model, x_b, y_b, "cpu").mean())
    asr_before = pool_asr(model, pool.x_val, pool.y_val, badnets.trigger, "cpu")
    ce = unlearn(model, x_b, y_b, "cpu", ABLParams(unlearning_epochs=5, unlearning_lr=5e-3, batch_size=32), _gen())
    after = float(isolation_losses(model, x_b, y_b, "cpu").mean())
    assert len(ce) == 5 and ce[-1] > ce[0]
    assert after > before + 1.0, (before, after)
    assert pool_asr(model, pool.x_val, pool.y_val, badnets.trigger, "cpu") < asr_before - 0.3


def test_abl_pipeline_tiny_budget(badnets):
    r = run_defense("abl", badnets, "quick", TINY_ABL, pool_size=100, measure="subset:50")
    arts = r["artifacts"]
    assert arts["n_train"] == 300 and arts["n_isolated"] == 15
    assert 0 <= arts["isolation_precision"] <= 1 and arts["augment"] == badnets.card["training"]["augment"]
    assert sum(arts["loss_histograms"]["series"][0]["clean"]) == pytest.approx(1.0)
    assert [len(r["curves"][k]) for k in ("isolation", "finetune", "unlearning")] == [1, 1, 1]
    assert "ce_isolated" in r["curves"]["unlearning"][0] and r["ba"] is not None


def test_abl_needs_the_poisoned_training_set():
    d = get_defense("abl")
    assert d.threat.poisoned_training_set and not d.threat.clean_pool
    with pytest.raises(ValueError, match="poisoned training set"):
        d.check_applicable(suspects.load("demo:clean"))
    with pytest.raises(ValueError, match="unlearning_epochs"):
        d.make_params("quick", {"unlearning_epochs": 0, "finetune_epochs": 0})


# --- BTI-DBF -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (2, 3, 20, 20)])
def test_unet_generator_keeps_the_image_shape(shape):
    for blocks in (2, 4):
        assert UNetGenerator(shape[1], 4, blocks)(torch.rand(shape)).shape == shape


def test_head_on_features_is_the_model(badnets, pool):
    x = pool.x[:8]
    model = badnets.model.eval()
    with torch.no_grad():
        assert torch.allclose(head_from_features(model, features(model, x)), model(x), atol=1e-5)
    m = benign_mask(torch.tensor([-3.0, 0.0, 3.0]))
    assert 0.0 <= float(m.min()) and float(m.max()) < 1.0 and float(m[1]) == pytest.approx(0.5)


def test_decoupling_finds_a_benign_mask(badnets, pool):
    inv = copy.deepcopy(badnets.model)
    for q in inv.parameters():
        q.requires_grad_(False)
    p = BTIDBFParams(mround=5, mask_lr=0.1, batch_size=35, augment="none")
    mask, losses = decouple(inv, pool.x[:70], pool.y[:70], "cpu", p, _gen())
    assert mask.shape[0] == 1 and mask.shape[1:] == features(inv, pool.x[:1]).shape[1:]
    assert losses[-1] < losses[0] - 0.5, losses  # m phi classifies, (1 - m) phi does not
    assert all(torch.equal(a, b) for a, b in zip(inv.parameters(), badnets.model.parameters(), strict=True))


def test_pretraining_pulls_the_generator_to_the_identity(badnets, pool):
    torch.manual_seed(0)
    x, y = pool.x[:70], pool.y[:70]
    g = UNetGenerator(1, 4, 2)
    p = BTIDBFParams(preround=3, gen_lr=1e-2, batch_size=35, augment="none")

    def mse(net) -> float:
        with torch.no_grad():
            return float(F.mse_loss(net.eval()(x), x))

    start = mse(g)
    opt = torch.optim.Adam(g.parameters(), lr=p.gen_lr)
    losses = pretrain_generator(g, copy.deepcopy(badnets.model), x, y, "cpu", p, opt, _gen())
    assert losses[-1] < losses[0] and mse(g) < start, (losses, start, mse(g))
    torch.manual_seed(0)
    near = mse(UNetGenerator(1, 4, 2, residual=True))  # the residual generator starts near, not at, the identity
    assert 0.0 < near < 0.1 * start, (near, start)


def test_target_detection_and_unlearning_with_the_true_trigger(badnets, pool):
    """With the known trigger standing in for a perfect generator, the majority vote finds the target and the
    unlearning step removes most of the backdoor."""
    trig = badnets.trigger
    target, shares = detect_target(badnets.model, trig, pool.x, "cpu", num_classes=10)
    assert target == trig.target and shares[target] > 0.9
    model = copy.deepcopy(badnets.model)
    before = pool_asr(model, pool.x_val, pool.y_val, trig, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    p = BTIDBFParams(batch_size=70, augment="none", gen_share=0.3)
    unlearn_with_generator(model, trig, pool.x, pool.y, "cpu", p, opt, _gen(), epochs=3)
    assert pool_asr(model, pool.x_val, pool.y_val, trig, "cpu") < before - 0.5


def test_btidbf_pipeline_tiny_budget(badnets):
    r = run_defense("btidbf", badnets, "quick", TINY_BTI, pool_size=100, measure="subset:50")
    arts = r["artifacts"]
    assert 0 <= arts["detected_target"] < 10 and len(arts["target_shares"]) == 10
    assert arts["attack_target"] == 0 and arts["target_correct"] == (arts["detected_target"] == 0)
    assert arts["rounds_run"] == 2 and len(r["curves"]["rounds"]) == 2 and len(r["curves"]["pretrain"]) == 1
    assert {"mask_benign_share", "image_mse", "held_out_ba", "unlearn_loss"} <= set(r["curves"]["rounds"][0])
    assert r["ba"] is not None


# --- both: cancellation and the sealed test split ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["abl", "btidbf"])
def test_cancellation_between_steps(badnets, name):
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        run_defense(name, badnets, "quick", TINY[name], pool_size=100, should_stop=stop)
    assert calls["n"] == 4  # stopped at the first check after the request


@pytest.mark.parametrize("name", ["abl", "btidbf"])
def test_runs_on_a_suspect_whose_test_split_is_sealed(badnets, name):
    sealed = without_test_split(badnets)
    d = get_defense(name)
    ctx = RepairContext(sealed, defense_pool(badnets, 100), torch.device("cpu"), seed=0)
    out = d.repair(copy.deepcopy(badnets.model), d.make_params("quick", TINY[name]), ctx)
    assert out.model is not None and out.artifacts["held_out_ba"] is not None
