"""Fidelity to the official code (issue 18) and the critical-block rule (issue 17.3).

The ranking statistics are checked on hand-made activations whose signed / absolute and post-ReLU statistics
order the channels differently; the augmentation and schedule a defense uses are recorded while it really runs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import defenses.anp
import defenses.common
import defenses.fineprune
import defenses.linf_prune
import suspects
from analysis.shortcuts import MIN_CRITICAL_SCORE, skip_ablation
from defenses import ParamError, get_defense, run_defense
from defenses.common import head

pytestmark = pytest.mark.usefixtures("one_thread")

# (N=2, C=3, 1x2) maps. Channel 0 fires strongly on half its positions and is strongly negative on the other half
# (signed mean 0, post-ReLU mean 2.5); channel 1 is weakly on everywhere (1, 1); channel 2 is always negative (0).
ACTS = torch.tensor([[[[-5.0, 5.0]], [[1.0, 1.0]], [[-10.0, -10.0]]],
                     [[[-5.0, 5.0]], [[1.0, 1.0]], [[-10.0, -10.0]]]])


def _ctx(**kw) -> SimpleNamespace:
    return SimpleNamespace(pool=SimpleNamespace(x=torch.zeros(2, 1, 4, 4), y=torch.tensor([1, 2])), device="cpu", **kw)


def test_fineprune_ranks_by_mean_post_relu_activation(monkeypatch):
    assert defenses.fineprune.mean_activation(ACTS).tolist() == [2.5, 1.0, 0.0]
    monkeypatch.setattr(defenses.fineprune, "last_layer_activations", lambda model, x, device: ACTS)
    fp = get_defense("fineprune")
    order, info = fp.rank_channels(None, fp.make_params("paper"), _ctx())
    assert order == [2, 1, 0] and info["score"] == "E[ReLU(A_k(x))]"  # the firing channel 0 is pruned last
    signed, _ = fp.rank_channels(None, fp.make_params("paper", {"activation": "signed"}), _ctx())
    assert signed == [2, 0, 1]  # the former statistic: channel 0 (mean 0) looked more dormant than channel 1


def test_linf_prune_scores_post_relu_maps(monkeypatch):
    # triggered copies: channel 0 swings to -9 (a large |a| but no post-ReLU response), channel 1 rises to 2
    clean = torch.zeros(2, 3, 1, 2)
    trig = clean.clone()
    trig[:, 0] = -9.0
    trig[:, 1, :, 1] = 2.0
    monkeypatch.setattr(defenses.linf_prune, "last_layer_activations",
                        lambda model, x, device: trig if x.sum() > 0 else clean)
    lp = get_defense("linf_prune")
    ctx = _ctx(trigger=AddOne())
    order, info = lp.rank_channels(None, lp.make_params("paper"), ctx)
    assert order[0] == 1 and info["top_scores"][0] == 2.0 and info["score"].startswith("E||relu(")
    old, info = lp.rank_channels(None, lp.make_params("paper", {"activation": "abs"}), ctx)
    assert old[0] == 0 and info["top_scores"][0] == 9.0  # |a| took the negative swing for a trigger spike


class AddOne:
    """A stand-in trigger: adds 1 to every pixel (so the hooked activations can tell triggered copies apart)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0

    def test_mask(self, y: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(y), dtype=torch.bool)


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


def test_anp_augments_with_crop_and_flip_as_the_official_code(badnets, monkeypatch):
    modes: list[str] = []
    real = defenses.anp.augment_batch

    def record(x, mode, gen, pad=None):
        modes.append(mode)
        return real(x, mode, gen, pad)

    monkeypatch.setattr(defenses.anp, "augment_batch", record)
    report = run_defense("anp", badnets, "paper", {"iterations": 2, "batch_size": 8}, pool_size=40)
    assert set(modes) == {"crop-flip"} and len(modes) == 2 and report["params"]["augment"] == "crop-flip"
    modes.clear()
    run_defense("anp", badnets, "paper", {"iterations": 2, "batch_size": 8, "augment": "crop"}, pool_size=40)
    assert set(modes) == {"crop"}


def test_shortcut_paper_preset_fine_tunes_as_the_official_code(badnets, monkeypatch):
    seen: list[dict] = []
    real_fit, real_aug = defenses.common.fit, defenses.common.augment_batch
    modes: set[str] = set()

    def fit(model, batches, loss_fn, opt, **kw):
        lrs = []
        inner = kw.get("after_step")

        def after_step():
            lrs.append(opt.param_groups[0]["lr"])
            if inner:
                inner()

        kw["after_step"] = after_step
        out = real_fit(model, batches, loss_fn, opt, **kw)
        seen.append({"lrs": lrs, "scheduler": kw.get("scheduler")})
        return out

    monkeypatch.setattr(defenses.common, "fit", fit)
    monkeypatch.setattr(defenses.common, "augment_batch", lambda x, mode, gen, pad=None: modes.add(mode) or
                        real_aug(x, mode, gen, pad))
    report = run_defense("shortcut", badnets, "paper", {"steps": 4, "block": "layer4.1", "batch_size": 32},
                         pool_size=80)
    p = report["params"]
    assert (p["lr"], p["momentum"], p["weight_decay"], p["batch_size"] != 128) == (0.01, 0.9, 5e-4, True)
    assert get_defense("shortcut").make_params("paper").batch_size == 128
    lrs = seen[-1]["lrs"]
    assert len(lrs) == 4 and set(lrs) == {0.01}  # 4 steps of 32 of the pool's training part, constant rate
    assert modes == {"none"} and report["artifacts"]["fine_tune_images"] == report["pool_split"]["train"] == 56
    modes.clear()
    run_defense("shortcut", badnets, "quick", {"steps": 2, "block": "layer4.1"}, pool_size=80)
    assert modes == {"crop"} and len(set(seen[-1]["lrs"])) > 1  # the former cosine schedule, kept as quick


@pytest.fixture()
def always_target():
    """The demo BadNets suspect with a head that answers the target whatever the input: ASR is 1.0 at every
    gamma of every block, so no block matters."""
    s = suspects.load("demo:badnets")
    lin = head(s.model)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.bias[s.trigger.target] = 5.0
    return s


def test_no_critical_block_when_every_score_ties_at_zero(always_target):
    s = always_target
    test = s.test.subset(torch.arange(200))
    mask = s.trigger.test_mask(test.labels)
    x = test.images()
    res = skip_ablation(s.model, x, test.labels, s.trigger(x[mask]), s.trigger.target_labels(test.labels[mask]),
                        gammas=(1.0, 0.5, 0.0))
    assert set(res.table.asr) == {1.0} and set(res.scores.values()) == {0.0}
    assert res.critical_block is None  # formerly layer1.0, the first of the tie
    assert "no critical block" in res.no_critical_reason() and str(MIN_CRITICAL_SCORE) in res.no_critical_reason()
    with pytest.raises(ParamError, match="no critical block.*name a block"):
        run_defense("shortcut", s, "quick", {"steps": 2, "block": "auto"}, pool_size=100)  # quick names 'last'
    named = run_defense("shortcut", s, "quick", {"steps": 2, "block": "layer3.1"}, pool_size=100)
    assert named["artifacts"]["block"] == "layer3.1"


def test_critical_block_named_when_a_block_matters(badnets):
    test = badnets.test.subset(torch.arange(200))
    mask = badnets.trigger.test_mask(test.labels)
    x = test.images()
    res = skip_ablation(badnets.model, x, test.labels, badnets.trigger(x[mask]),
                        badnets.trigger.target_labels(test.labels[mask]), gammas=(1.0, 0.5, 0.0))
    best = max(res.scores, key=res.scores.get)
    assert res.scores[best] > MIN_CRITICAL_SCORE and res.critical_block == best and res.no_critical_reason() == ""


# --- issue 29: AWM's mask schedule, SAU's clamp, FST's projection order -------------------------------------------


def test_awm_decays_the_mask_learning_rate_once_per_outer_epoch(badnets):
    report = run_defense("awm", badnets, "quick", {"outer": 3, "steps": 1, "batch_size": 16}, pool_size=40)
    assert report["params"]["lr2_decay"] == 0.9 == get_defense("awm").Params().lr2_decay  # official default
    assert [r["lr2"] for r in report["curves"]["outer"]] == pytest.approx([0.01, 0.009, 0.0081])
    flat = run_defense("awm", badnets, "quick", {"outer": 3, "steps": 1, "batch_size": 16, "lr2_decay": 1.0},
                       pool_size=40)
    assert [r["lr2"] for r in flat["curves"]["outer"]] == pytest.approx([0.01] * 3)


def test_sau_shared_risk_has_a_gradient_for_confident_shared_examples():
    from defenses.sau import shared_risk

    # row 0: p(y_0) ~ 0.99995 (confident, above the former clamp at 0.999); row 1: p(y_0) ~ 5e-5 (below 0.001)
    logits = torch.tensor([[12.0, 0.0, 0.0], [0.0, 10.0, 0.0]], requires_grad=True)
    y0 = torch.tensor([0, 2])
    loss = shared_risk(logits, y0, torch.tensor([True, True]))
    loss.backward()
    assert logits.grad[0].abs().sum() > 1e-3  # the confident example is still unlearned (was exactly 0)
    assert logits.grad[1].abs().sum() == 0  # p < 0.001: both one-sided bounds hold, no gradient (as official)
    probs = torch.softmax(logits.detach()[0], 0)
    one = shared_risk(logits.detach(), y0, torch.tensor([True, False]))  # row 0 only, divided by the batch of 2
    expected = -(torch.log(1e-6 + probs[1:].sum()) + torch.log(1 + 1e-6 - probs[0])) / 2 / 2
    assert float(one) == pytest.approx(float(expected), rel=1e-5)
    no_poison = shared_risk(logits.detach(), y0, torch.tensor([False, False]))
    assert float(no_poison) == 0.0


def test_fst_rescales_the_head_only_after_steps(badnets, monkeypatch):
    import defenses.fst

    seen: dict = {}
    real = defenses.fst.fine_tune

    def spy(model, ctx, **kw):
        lin = head(model)
        seen["start_norm"] = float(lin.weight.norm())
        seen["steps"] = 0
        inner = kw["after_step"]

        def after_step():
            seen["steps"] += 1
            inner()
        kw["after_step"] = after_step
        return real(model, ctx, **kw)

    monkeypatch.setattr(defenses.fst, "fine_tune", spy)
    norm_ori = float(head(badnets.model).weight.detach().norm())
    report = run_defense("fst", badnets, "quick", {"steps": 2, "batch_size": 16}, pool_size=40)
    # U(-1/sqrt(d), 1/sqrt(d)) on K x d weights: norm about sqrt(K / 3), not the original head's norm
    assert seen["start_norm"] == pytest.approx((badnets.num_classes / 3) ** 0.5, rel=0.2)
    assert abs(seen["start_norm"] - norm_ori) > 0.1 * norm_ori
    assert seen["steps"] == 2
    assert float(head(report.suspect.model).weight.norm()) == pytest.approx(norm_ori, rel=1e-4)
    assert report["artifacts"]["passes"] == 1.0  # 28 training images of a 40-image pool: batches of 16 and 12


def test_every_registered_defense_has_a_fidelity_section():
    """docs/fidelity.md has a section per registered defense (a heading naming it in backquotes) with a table of
    what the official code does and what we do; a new defense must add one (issue 29)."""
    from pathlib import Path

    from defenses.registry import list_defenses

    text = (Path(__file__).resolve().parent.parent / "docs" / "fidelity.md").read_text()
    sections = {}
    for part in text.split("\n### ")[1:]:
        head, _, body = part.partition("\n")
        if head.startswith("`"):
            sections[head.split("`")[1]] = body.split("\n## ")[0]
    # the project's own defenses (a third-party plugin a test installs documents itself)
    ours = [d for d in list_defenses() if type(get_defense(d)).__module__.split(".")[0] == "defenses"]
    assert len(ours) >= 11
    missing = [d for d in ours if d not in sections]
    assert not missing, (f"docs/fidelity.md has no section for {missing}: add a '### `NAME`: title' section with a "
                         "table | aspect | official code | ours | why | measured | (see the sections there)")
    for name in ours:
        body = sections[name]
        assert "| aspect |" in body and ("official code" in body or "the paper" in body), name
        assert body.count("\n|") >= 3, f"the {name} section has no table rows"
