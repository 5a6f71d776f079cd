"""SAU, FST and i-BAU: each removes the demo BadNets backdoor with a tiny budget while keeping BA within a stated
bound, refuses nonsense parameters before running, and cancels cleanly (also inside its inner loops)."""

from __future__ import annotations

import copy

import pytest
import torch

import suspects
from defenses import Cancelled, ParamError, RepairContext, get_defense, list_defenses, run_defense
from defenses.common import head
from defenses.ibau import IBAU, IBAUParams
from defenses.runner import defense_pool
from suspects.device import prepare_model

pytestmark = pytest.mark.usefixtures("one_thread")

# the quick presets cut short (a 500-image pool: 350 train + 150 held out), enough to show each method's
# effect in well under a minute on one thread (SAU: 2 rounds at lr 1e-3 cost the width-16 demo 45 BA points,
# 2 rounds at 5e-4 left ASR 0.80; 4 rounds at 5e-4: BA -0.11, ASR 0.09)
TINY = {
    "sau": {"n_rounds": 4, "adv_steps": 2, "lr": 5e-4},
    "fst": {"steps": 21},
    "ibau": {"n_rounds": 2, "K": 2},
}
EVAL_IMAGES = 500  # test images measured before and after (the first 500 of the demo test split)
BA_BOUND = 0.15  # the largest BA drop each tiny run may cost


@pytest.fixture(scope="module")
def badnets():
    s = suspects.load("demo:badnets")
    s.model = prepare_model(s.model, "cpu").eval()
    return s


@pytest.fixture(scope="module")
def before(badnets):
    return suspects.evaluate(badnets.model, badnets.test, badnets.trigger, limit=EVAL_IMAGES)


def _repair(suspect, name: str, overrides: dict, stop=lambda: False, ticks: list | None = None, pool: int = 200):
    defense = get_defense(name)
    params = defense.make_params("quick", overrides)
    model = prepare_model(copy.deepcopy(suspect.model), "cpu").eval()
    ctx = RepairContext(suspect, defense_pool(suspect, pool, seed=0), torch.device("cpu"), seed=0,
                        progress=lambda f, m, d: ticks.append((f, m, d)) if ticks is not None else None,
                        should_stop=stop, poll_interval=0.0)
    return defense.repair(model, params, ctx)


def test_the_three_are_registered_after_the_others():
    names = list_defenses()
    assert [n for n in names if n in ("sau", "fst", "ibau")] == ["sau", "fst", "ibau"]
    assert names.index("sau") > max(names.index("dbd"), names.index("cbd"))  # after the retraining defenses
    for name in ("sau", "fst", "ibau"):
        d = get_defense(name)
        assert d.paper and "arXiv" in d.paper and {"quick", "paper"} <= set(d.presets)
        assert d.make_params("paper") == d.Params()  # the paper preset is the dataclass defaults


@pytest.mark.parametrize("name", ["sau", "fst", "ibau"])
def test_removes_the_badnets_backdoor_within_the_ba_bound(badnets, before, name):
    ticks: list = []
    out = _repair(badnets, name, TINY[name], ticks=ticks, pool=500)
    after = suspects.evaluate(out.model, badnets.test, badnets.trigger, limit=EVAL_IMAGES)
    assert before.asr > 0.95
    assert after.asr < 0.5, (name, after)  # from ~1.0: a wide margin
    assert after.ba >= before.ba - BA_BOUND, (name, before, after)
    assert ticks and ticks[-1][0] == pytest.approx(1.0) and all("held_out_ba" in t[2] or "loss" in t[2] for t in ticks)
    # the suspect itself is untouched
    assert suspects.evaluate(badnets.model, badnets.test, badnets.trigger, limit=200).asr > 0.95


def test_fst_keeps_the_classifier_norm_and_moves_it_away(badnets):
    w0 = head(badnets.model).weight.detach().clone()
    out = _repair(badnets, "fst", {"steps": 7})
    w = head(out.model).weight.detach()
    assert float(w.norm()) == pytest.approx(float(w0.norm()), rel=1e-4)
    cosine = float((w * w0).sum() / (w.norm() * w0.norm()))
    assert cosine == pytest.approx(out.artifacts["classifier_cosine"], abs=1e-5)
    assert cosine < 0.5  # re-initialised and pushed away from the original classifier


def test_ibau_hypergradient_matches_unrolled_differentiation():
    """On a tiny linear model the fixed-point hypergradient (K large) equals the gradient of the outer loss at the
    fixed point of the inner map, obtained by differentiating through many unrolled inner steps."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    xb, yb = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    p = IBAUParams(K=200, eta=0.1, reg=1.0, portion=1.0)
    weights = list(lin.parameters())

    # the fixed point of Phi for this strongly convex inner problem (reg dominates), by plain iteration
    delta = torch.zeros(1, 1, 2, 2)
    for _ in range(500):
        d = delta.clone().requires_grad_(True)
        g = -torch.nn.functional.cross_entropy(lin(xb + d), yb) + p.reg * d.pow(2).sum()
        (gd,) = torch.autograd.grad(g, d)
        delta = (d - p.eta * gd).detach()

    # unrolled: 500 differentiable inner steps from the fixed point, then the outer loss
    d = delta.clone()
    for _ in range(500):
        d = d.requires_grad_(True) if not d.requires_grad else d
        g = -torch.nn.functional.cross_entropy(lin(xb + d), yb) + p.reg * d.pow(2).sum()
        (gd,) = torch.autograd.grad(g, d, create_graph=True)
        d = d - p.eta * gd
    unrolled = torch.autograd.grad(torch.nn.functional.cross_entropy(lin(xb + d), yb), weights)

    class _Capture(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            self.grads = [q.grad.clone() for q in self.param_groups[0]["params"]]

    cap = _Capture(weights)
    IBAU._hyper_step(lin, weights, cap, delta, xb, yb, p, torch.Generator().manual_seed(0))
    for a, b in zip(cap.grads, unrolled, strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a, b)


@pytest.mark.parametrize("name,overrides,message", [
    ("sau", {"lmd_1": 0, "lmd_2": 0, "lmd_3": 0}, "must not all be 0"),
    ("sau", {"trigger_norm": 2}, "'trigger_norm' must lie in"),
    ("sau", {"pgd_init": "corner"}, "'pgd_init' must be one of"),
    ("sau", {"adv_steps": 0}, "'adv_steps' must lie in"),
    ("fst", {"alpha": -0.2}, "'alpha' must lie in"),
    ("fst", {"steps": 1.5}, "whole number"),
    ("fst", {"reinit": "maybe"}, "true or false"),
    ("ibau", {"K": 0}, "'K' must lie in"),
    ("ibau", {"portion": float("nan")}, "'portion' must be finite"),
    ("ibau", {"lr": "fast"}, "'lr' must be a number"),
    ("ibau", {"gamma": 1}, "unknown parameter"),
])
def test_nonsense_parameters_are_refused_before_running(badnets, name, overrides, message):
    calls: list = []
    with pytest.raises(ParamError, match=message):
        run_defense(name, badnets, "quick", overrides, progress=lambda f, m, d: calls.append(m))
    assert calls == []  # refused before anything ran (not even the measurement of the suspect)


# at least three polls (one per step or batch) before the first epoch or round ends
CANCEL = {"sau": {"n_rounds": 5, "batch_size": 40}, "fst": {"steps": 50, "batch_size": 40},
          "ibau": {"n_rounds": 5, "batch_size": 40}}


@pytest.mark.parametrize("name", ["sau", "fst", "ibau"])
def test_cancels_inside_the_inner_loop(badnets, name):
    """should_stop turns true on its third poll, before any epoch or round ends: Cancelled, no tick, and the
    suspect's own model untouched."""
    state = {k: v.clone() for k, v in badnets.model.state_dict().items()}
    polls: list = []
    ticks: list = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(Cancelled):
        _repair(badnets, name, CANCEL[name], stop=stop, ticks=ticks)
    assert ticks == [] and len(polls) == 3
    assert all(torch.equal(v, badnets.model.state_dict()[k]) for k, v in state.items())
