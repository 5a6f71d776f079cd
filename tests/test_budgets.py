"""Budgets and measurement: fine-tuning counted in optimisation steps, ``measure="auto"``, and the rule that a
defense never receives a test image (its suspect's test split is sealed while it runs)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import suspects
from defenses import RepairContext, get_defense, list_defenses, run_defense
from defenses.base import Defense, DefenseOutput, ThreatModel
from defenses.common import fine_tune
from defenses.registry import _REGISTRY
from defenses.runner import AUTO_FULL_LIMIT, AUTO_SUBSET, defense_pool, parse_measure
from runs.timing import budget_passes
from suspects.device import prepare_model
from suspects.store import SealedSplitError, without_test_split

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_fine_tune_takes_exactly_the_steps_it_is_given(badnets, steps):
    pool = defense_pool(badnets, 100, seed=0)  # 80 training images: 2 batches of 64 per pass
    model = prepare_model(suspects.load("demo:badnets").model, "cpu")
    ctx = RepairContext(badnets, pool, torch.device("cpu"), seed=0)
    taken = []
    reports = []
    ctx.progress = lambda f, m, d: reports.append((f, m))
    losses = fine_tune(model, ctx, steps=steps, lr=0.01, batch_size=64, after_step=lambda: taken.append(1))
    assert len(taken) == steps
    assert len(losses) == -(-steps // 2)  # one mean loss per (possibly partial) pass over the pool
    assert reports[-1][0] == pytest.approx(1.0) and reports[-1][1].endswith(f"step {steps}/{steps}")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fine_tune(model, ctx, steps=0, lr=0.01, batch_size=64)


def test_finetune_budget_does_not_depend_on_the_pool_size(badnets):
    """The same ``steps`` preset is the same work on a small and a large pool (it was epochs before)."""
    for pool_size in (100, 300):
        r = run_defense("finetune", badnets, "quick", {"steps": 3}, pool_size=pool_size, measure="subset:50")
        assert r["curves"]["loss"] and len(r["curves"]["loss"]) == (2 if pool_size == 100 else 1)
        assert r["params"]["steps"] == 3


def test_measure_auto_uses_the_whole_small_split_and_a_subset_of_a_large_one():
    assert parse_measure("auto", 2500) is None
    assert parse_measure("auto", AUTO_FULL_LIMIT) is None
    assert parse_measure("auto", AUTO_FULL_LIMIT + 1) == AUTO_SUBSET
    assert parse_measure("auto") is None  # size unknown: validation only
    assert parse_measure("full", 10**6) is None and parse_measure("subset:7", 10) == 7
    with pytest.raises(ValueError, match="'auto'"):
        parse_measure("most")


@dataclass
class _NoParams:
    pass


class _PeekAtTest(Defense):
    """A defense that cheats: it reads the test split (the runner must stop it)."""

    name = "_peek_at_test"
    title = "peeks at the test split"
    paper = "none"
    summary = "test double"
    threat = ThreatModel(clean_pool=True)
    Params = _NoParams
    presets = {"quick": {}}
    how = "test"

    def repair(self, model, params, ctx: RepairContext) -> DefenseOutput:
        if self.how == "test":
            ctx.suspect.test.images()
        elif self.how == "data":
            len(ctx.suspect.data.test)
        return DefenseOutput(model, {"pool": len(ctx.pool)}, {})


@pytest.mark.parametrize("how", ["test", "data", "pool only"])
def test_a_defense_never_receives_a_test_image(badnets, how):
    cheat = _PeekAtTest()
    cheat.how = how
    _REGISTRY[cheat.name] = cheat
    try:
        if how == "pool only":  # the honest path runs, and the runner still measures on the test split
            r = run_defense(cheat.name, badnets, "quick", pool_size=50, measure="subset:40")
            assert r["artifacts"]["pool"] == 50 and r["n_clean"] == 40
        else:
            with pytest.raises(SealedSplitError, match="may not read the test split"):
                run_defense(cheat.name, badnets, "quick", pool_size=50, measure="subset:40")
    finally:
        _REGISTRY.pop(cheat.name, None)


def test_sealed_view_keeps_everything_but_the_test_split(badnets):
    view = without_test_split(badnets)
    assert view.model is badnets.model and view.card is badnets.card
    assert len(view.defense_pool) == len(badnets.defense_pool) and view.trigger.spec() == badnets.trigger.spec()
    assert len(badnets.test) == 2500  # the original is untouched
    for use in (lambda: view.test.labels, lambda: len(view.test), lambda: view.test[0], lambda: list(view.test)):
        with pytest.raises(SealedSplitError):
            use()


@pytest.mark.parametrize("name", list_defenses())
def test_every_quick_preset_has_an_estimate_before_it_starts(name):
    """Issue 17.4: every quick preset's wall time is estimated from its budget (no defense is "not counted")."""
    params = get_defense(name).make_params("quick", {})
    passes = budget_passes(name, params, 400, 100, 64, n_trainset=9500)
    assert passes is not None and passes > 0
    more = get_defense(name).make_params("paper", {})
    assert budget_passes(name, more, 400, 100, 64, n_trainset=9500) > 0  # and the official budget too


def test_training_time_budgets_need_the_training_set_size():
    dbd = get_defense("dbd").make_params("quick", {})
    assert budget_passes("dbd", dbd, 400, 100, 64, n_trainset=0) is None
    assert budget_passes("dbd", dbd, 400, 100, 64, n_trainset=2000) < budget_passes("dbd", dbd, 400, 100, 64,
                                                                                     n_trainset=9000)
