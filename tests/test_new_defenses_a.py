"""NAD, CLP and FT-SAM (issue 31): each runs a step on a tiny budget through the runner (whose sealed test split
would refuse a read), cancels cleanly, and computes what its paper says on hand-made inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import suspects
from defenses import Cancelled, RepairContext, get_defense, list_defenses, run_defense
from defenses.clp import channel_lipschitz, pair_by_dataflow, pair_by_registration
from defenses.context import DefensePool
from defenses.ftsam import SAM, smoothed_cross_entropy
from defenses.nad import attention_map, distilled_layers
from defenses.runner import defense_pool
from suspects.device import prepare_model
from suspects.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("nad", "clp", "ftsam")
TINY = {"nad": {"teacher_steps": 2, "steps": 2, "batch_size": 16},
        "clp": {},
        "ftsam": {"steps": 2, "batch_size": 16}}


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


def test_the_three_are_registered_with_their_threat_models():
    names = list_defenses()
    for name in NAMES:
        d = get_defense(name)
        assert name in names and d.paper and "arXiv" in d.paper and {"quick", "paper"} <= set(d.presets)
        assert d.make_params("paper") == d.Params()  # the paper preset is the dataclass defaults
    assert get_defense("clp").threat.clean_pool is False  # data-free
    assert "needs nothing but the model" in get_defense("clp").threat.describe()
    assert get_defense("nad").threat.clean_pool and get_defense("ftsam").threat.clean_pool


@pytest.mark.parametrize("name", NAMES)
def test_a_step_runs_through_the_runner_with_the_test_split_sealed(badnets, name):
    """run_defense hands the defense a suspect whose test split raises on any read (tests/test_budgets.py): a
    finished run is a run that never read it."""
    r = run_defense(name, badnets, "quick", TINY[name], pool_size=60, measure="subset:40")
    assert r["n_clean"] == 40 and 0.0 <= r["ba"] <= 1.0 and 0.0 <= r["asr"] <= 1.0
    assert r["defense"] == name


@pytest.mark.parametrize("name", ["nad", "ftsam"])
def test_cancels_inside_the_training_loop(badnets, name):
    """should_stop turns true on its third poll, inside the first pass: Cancelled, no tick, suspect untouched."""
    state = {k: v.clone() for k, v in badnets.model.state_dict().items()}
    polls: list = []
    ticks: list = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) >= 3

    d = get_defense(name)
    model = prepare_model(copy.deepcopy(badnets.model), "cpu").eval()
    ctx = RepairContext(badnets, defense_pool(badnets, 100, seed=0), torch.device("cpu"), seed=0,
                        progress=lambda f, m, dd: ticks.append(f), should_stop=stop, poll_interval=0.0)
    overrides = {"nad": {"teacher_steps": 20, "steps": 20, "batch_size": 8}, "ftsam": {"steps": 20, "batch_size": 8}}
    with pytest.raises(Cancelled):
        d.repair(model, d.make_params("quick", overrides[name]), ctx)
    assert ticks == [] and len(polls) == 3
    assert all(torch.equal(v, badnets.model.state_dict()[k]) for k, v in state.items())


def test_clp_cancels_between_layers(badnets):
    d = get_defense("clp")
    model = prepare_model(copy.deepcopy(badnets.model), "cpu").eval()
    ticks: list = []
    ctx = RepairContext(badnets, _empty_pool(), torch.device("cpu"), progress=lambda f, m, dd: ticks.append(f),
                        should_stop=lambda: len(ticks) >= 2)
    with pytest.raises(Cancelled):
        d.repair(model, d.make_params("quick"), ctx)
    assert len(ticks) == 2


def _empty_pool() -> DefensePool:
    e = torch.empty(0, 1, 28, 28)
    return DefensePool(e, torch.empty(0, dtype=torch.long), e, torch.empty(0, dtype=torch.long))


# --- CLP -------------------------------------------------------------------------------------------------------

def _tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    m = create_model(arch, num_classes=3, in_channels=1, width=4)
    for mod in m.modules():  # running statistics away from their defaults
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return m.eval()


def test_clp_pairs_bn_with_the_conv_that_feeds_it():
    post = _tiny("resnet18")  # conv -> BN everywhere: both rules agree
    flow, skipped = pair_by_dataflow(post, (1, 16, 16), "cpu")
    assert skipped == 0 and sorted(flow) == sorted(pair_by_registration(post)[0])
    pre = _tiny("preact_resnet18")  # BN -> conv: only the BN right after a conv is paired
    flow, skipped = pair_by_dataflow(pre, (1, 16, 16), "cpu")
    assert ("layer1.0.bn1", "conv1") in flow and ("layer2.0.bn2", "layer2.0.conv1") in flow
    assert not any(bn.endswith("bn1") and bn != "layer1.0.bn1" for bn, _ in flow)  # block inputs are sums
    assert skipped == 7
    reg = dict(pair_by_registration(pre)[0])
    assert reg["layer1.1.bn1"] == "layer1.0.conv2" and reg["layer2.1.bn1"] == "layer2.0.shortcut.0"  # official rule


def test_clp_uclc_and_pruning_on_a_planted_channel():
    conv, bn = nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1)))
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 1.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 1.0]))
    uclc = channel_lipschitz(conv, bn)
    for k in range(4):
        w = conv.weight[k].detach().reshape(2, 9) * abs(float(bn.weight[k]) / float(bn.running_var[k].sqrt()))
        assert float(uclc[k]) == pytest.approx(float(torch.linalg.svdvals(w).max()), rel=1e-5)

    model = _tiny("resnet18")
    bn_name, conv_name = "layer3.0.bn1", "layer3.0.conv1"
    mods = dict(model.named_modules())
    with torch.no_grad():
        mods[conv_name].weight[5] *= 40.0  # one channel that amplifies its input 40 times
    d = get_defense("clp")
    ctx = RepairContext(None, _empty_pool(), torch.device("cpu"))  # no data, not even a suspect card
    ctx_shape = {"input_shape": [1, 16, 16]}
    ctx.suspect = type("S", (), {"card": ctx_shape, "trigger": None})()
    out = d.repair(model, d.make_params("paper"), ctx)
    assert out.artifacts["pruned_per_layer"][bn_name] >= 1
    assert float(mods[bn_name].weight[5]) == 0.0 and float(mods[bn_name].bias[5]) == 0.0
    assert out.artifacts["skipped_layers"] == 0


def test_clp_is_not_applicable_without_batchnorm():
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    reason = get_defense("clp").not_applicable(plain)
    assert reason and "BatchNorm2d" in reason


# --- FT-SAM ----------------------------------------------------------------------------------------------------

def test_sam_step_descends_with_the_gradient_at_the_adaptively_perturbed_weights():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    rho, lr = 0.5, 0.1
    w0 = [p.detach().clone() for p in lin.parameters()]

    def loss() -> torch.Tensor:
        return smoothed_cross_entropy(lin(x), y, 0.1)

    # by hand: g at w, e = rho * w^2 * g / || |w| * g ||, g' at w + e, w - lr * g'
    g = torch.autograd.grad(loss(), list(lin.parameters()))
    norm = torch.sqrt(sum(((w.abs() * gi) ** 2).sum() for w, gi in zip(w0, g, strict=True)))
    es = [rho * w.pow(2) * gi / norm for w, gi in zip(w0, g, strict=True)]
    shifted = nn.Linear(3, 2)
    with torch.no_grad():
        for q, w, e in zip(shifted.parameters(), w0, es, strict=True):
            q.copy_(w + e)
    g2 = torch.autograd.grad(smoothed_cross_entropy(shifted(x), y, 0.1), list(shifted.parameters()))
    expected = [w - lr * gi for w, gi in zip(w0, g2, strict=True)]

    opt = SAM(torch.optim.SGD(lin.parameters(), lr=lr), lin, rho, True, loss)
    opt.zero_grad()
    loss().backward()
    opt.step()
    for q, e in zip(lin.parameters(), expected, strict=True):
        assert torch.allclose(q, e, atol=1e-6)


def test_sam_second_pass_leaves_batchnorm_running_stats_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).train()
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 0, 1])

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(net(x), y)

    opt = SAM(torch.optim.SGD(net.parameters(), lr=0.1), net, 1.0, True, loss)
    loss().backward()
    after_first = net[1].running_mean.clone()
    opt.step()
    assert torch.equal(net[1].running_mean, after_first) and net[1].momentum == 0.1


def test_smoothed_cross_entropy_matches_the_explicit_targets():
    logits, y = torch.randn(4, 5), torch.tensor([0, 4, 2, 2])
    target = torch.full((4, 5), 0.1 / 4)
    target[torch.arange(4), y] = 0.9
    expected = -(target * logits.log_softmax(1)).sum(1).mean()
    assert float(smoothed_cross_entropy(logits, y, 0.1)) == pytest.approx(float(expected), rel=1e-6)


# --- NAD -------------------------------------------------------------------------------------------------------

def test_nad_attention_maps_and_layers():
    fm = torch.randn(2, 3, 4, 4)
    am = attention_map(fm, 2.0)
    assert am.shape == (2, 1, 4, 4)
    assert torch.allclose(am.flatten(1).norm(dim=1), torch.ones(2), atol=1e-4)
    assert torch.allclose(am, attention_map(fm * 7.0, 2.0), atol=1e-5)  # scale-free
    pooled = attention_map(torch.randn(2, 8, 1, 1), 2.0)  # BackdoorBench's third map on PreAct-ResNet-18
    assert torch.allclose(pooled, torch.ones_like(pooled), atol=1e-4)  # always 1: that term carries nothing
    assert distilled_layers(_tiny("preact_resnet18")) == ["layer2.1", "layer3.1", "layer4.1"]


def test_nad_distils_toward_the_teacher(badnets):
    """With beta 0 the student stage is plain fine-tuning; with the paper's betas its loss carries the attention
    terms, so the two runs (same seed, same batches) end with different students."""
    d = get_defense("nad")
    pool = defense_pool(badnets, 80, seed=0)

    def run(betas: float):
        model = prepare_model(copy.deepcopy(badnets.model), "cpu").eval()
        ctx = RepairContext(badnets, pool, torch.device("cpu"), seed=0)
        p = d.make_params("quick", {"teacher_steps": 2, "steps": 2, "batch_size": 16,
                                    "beta1": betas, "beta2": betas, "beta3": betas})
        return d.repair(model, p, ctx)

    plain, nad = run(0.0), run(1000.0)
    assert nad.artifacts["layers"] == ["layer2.1", "layer3.1", "layer4.1"]
    assert nad.curves["teacher_loss"] == plain.curves["teacher_loss"]  # the same teacher
    assert nad.curves["loss"][0] > plain.curves["loss"][0]  # the attention terms add to the loss
