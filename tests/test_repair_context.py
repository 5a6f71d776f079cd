"""The repair interface: every registered defense cancels through ``ctx.tick`` and leaves the suspect alone; the
typed defense pool; the registry's discovery and order; the shared ranked-pruning machinery."""

from __future__ import annotations

import copy
import time

import pytest
import torch

import suspects
from defenses import Cancelled, DefensePool, RepairContext, get_defense, list_defenses, run_defense
from defenses.common import head
from defenses.pruning import RankedPruning
from defenses.registry import defense_modules
from defenses.runner import DEFAULT_POOL_SIZE, HELD_OUT_FRACTION, defense_pool, resolve_pool_size
from suspects.device import prepare_model
from suspects.models import residual_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

# budgets only matter until the first tick; the training-time defenses get a small training set
SMALL = {"dbd": {"subset": 300, "simclr_batch_size": 100}, "cbd": {"subset": 300, "batch_size": 100}}


@pytest.fixture(scope="module")
def badnets():
    s = suspects.load("demo:badnets")
    s.model = prepare_model(s.model, "cpu")
    return s


def _snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: float(b.gamma) for n, b in residual_blocks(model)})


@pytest.mark.parametrize("name", list_defenses())
def test_every_defense_cancels_at_its_first_tick(badnets, name):
    """should_stop turns true once the defense has reported (through ctx.tick): the run raises Cancelled at that
    very tick, quickly, and the suspect's own model is untouched."""
    before = _snapshot(badnets.model)
    reports: list[str] = []

    def progress(fraction: float, message: str, metrics: dict) -> None:
        reports.append(message)

    def stop() -> bool:
        return len(reports) > 1  # reports[0] is the runner's "measuring the suspect"

    t0 = time.time()
    with pytest.raises(Cancelled):
        run_defense(name, badnets, "quick", SMALL.get(name, {}), pool_size=200, progress=progress, should_stop=stop)
    assert len(reports) == 2, reports  # cancelled at the defense's first report, none after it
    assert time.time() - t0 < 120
    state, gammas = _snapshot(badnets.model)
    assert gammas == before[1]
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)


def test_check_cancel_polls_at_most_every_interval(badnets):
    pool = defense_pool(badnets, 20)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    ctx = RepairContext(badnets, pool, torch.device("cpu"), should_stop=stop, poll_interval=3600.0)
    for _ in range(100):
        ctx.check_cancel()  # the first call polls, the rest fall inside the interval
    assert len(calls) == 1
    ctx.tick(0.5, "half way")  # a tick always asks
    assert len(calls) == 2
    with pytest.raises(Cancelled):
        ctx.tick(0.6, "again")


def test_defense_pool_is_typed_and_held_out(badnets):
    pool = defense_pool(badnets, 100)
    assert isinstance(pool, DefensePool)
    assert (pool.n_train, pool.n_held_out, len(pool)) == (70, 30, 100)
    assert pool.x.shape[0] == 70 and pool.x_val.shape[0] == 30 and len(pool.index) == 100
    assert set(pool.index.tolist()) <= set(range(len(badnets.defense_pool)))


def test_default_pool_is_the_whole_pool_up_to_1000_images(badnets):
    n = len(badnets.defense_pool)
    assert resolve_pool_size(None, n) == min(DEFAULT_POOL_SIZE, n) and resolve_pool_size(None, 5000) == 1000
    assert resolve_pool_size(40, n) == 40
    pool = defense_pool(badnets)
    assert len(pool) == min(1000, n) and pool.n_held_out == round(len(pool) * HELD_OUT_FRACTION)


def test_registry_discovers_defense_modules_and_keeps_the_order():
    mods = defense_modules()
    assert "defenses.dbd" in mods and "defenses.finetune" in mods
    assert not {"defenses.runner", "defenses.common", "defenses.pruning", "defenses.retrain",
                "defenses.context", "defenses.base"} & set(mods)
    names = list_defenses()
    assert names == ["shortcut", "linf_prune", "awm", "anp", "fineprune", "finetune", "ftsam", "nad", "clp", "rnp",
                     "dbd", "cbd", "abl", "sau", "fst", "ibau", "npd", "btidbf"]
    orders = [type(get_defense(n)).order for n in names]
    assert orders == sorted(orders)
    assert isinstance(get_defense("fineprune"), RankedPruning) and isinstance(get_defense("linf_prune"), RankedPruning)


def test_dbd_refuses_a_run_id_it_cannot_resolve(badnets):
    """A defense sees paths only: a run id given straight to run_defense (no run store to resolve it) is refused."""
    with pytest.raises(ValueError, match="run store"):
        run_defense("dbd", badnets, "quick", {**SMALL["dbd"], "reuse_backbone_from": "20240101-000000-dbd-abcdef"},
                    pool_size=100)


class _LastFirst(RankedPruning):
    """A ranking of our own: the highest channel index first; accepts every count and stops at the second."""

    name = "test_last_first"

    def rank_channels(self, model, params, ctx):
        self.accepted = 0
        n = head(model).in_features
        return list(range(n - 1, -1, -1)), {"ranking": "last first"}

    def tolerated(self, base, now, params):
        return True

    def enough(self, now, params):
        self.accepted += 1
        return self.accepted == 2


def test_ranked_pruning_base_runs_any_ranking(badnets):
    class P:
        max_ratio = 0.5

    model = copy.deepcopy(badnets.model)
    ticks = []
    ctx = RepairContext(badnets, defense_pool(badnets, 60), torch.device("cpu"),
                        progress=lambda f, m, d: ticks.append((f, m)))
    out = _LastFirst().repair(model, P(), ctx)
    n = head(model).in_features
    assert out.artifacts["n_pruned"] == 2 and out.artifacts["pruned_channels"] == [n - 1, n - 2]
    assert out.artifacts["ranking"] == "last first" and out.artifacts["n_channels"] == n
    w = head(out.model).weight
    assert torch.all(w[:, n - 2:] == 0) and torch.any(w[:, : n - 2] != 0)
    assert [r["pruned"] for r in out.curves["prune_curve"]] == [0, 1, 2] and len(ticks) == 2
