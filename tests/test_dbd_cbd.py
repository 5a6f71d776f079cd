"""DBD and CBD: each stage on a few hundred demo images for a few steps, the split / weights against the known
poisoned indices, the full pipeline with a tiny budget (stored run, backbone reuse), and cancellation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import suspects
from defenses import Cancelled, get_defense, run_defense
from defenses.cbd import (
    CBDParams,
    MIDiscriminator,
    cbd_weights,
    lr_at,
    train_backdoored,
    train_deconfounded_epoch,
    training_augment,
    weight_stats,
)
from defenses.common import head
from defenses.dbd import (
    BACKBONE_FILE,
    ProjectionHead,
    lambda_u_at,
    load_backbone,
    mixmatch_epoch,
    nt_xent,
    sce_loss,
    sce_split,
    simclr_augment,
    simclr_train,
    warmup_train,
)
from defenses.retrain import (
    TrainingSet,
    poisoned_training_set,
    reinitialize,
    split_quality,
    suspect_fingerprint,
)
from defenses.runner import defense_pool
from runs.jobs import create_run, execute
from runs.store import RunStore, run_file
from suspects.device import prepare_model

TINY_DBD = {"subset": 300, "simclr_epochs": 1, "simclr_batch_size": 100, "warmup_epochs": 1, "semi_epochs": 1,
            "iterations": 2, "batch_size": 32}
TINY_CBD = {"subset": 300, "steps_b": 3, "epochs": 1, "batch_size": 100}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def badnets():
    s = suspects.load("demo:badnets")
    s.model = prepare_model(s.model, "cpu")  # channels-last, as the runner does (much faster on a CPU)
    return s


@pytest.fixture(scope="module")
def clean():
    s = suspects.load("demo:clean")
    s.model = prepare_model(s.model, "cpu")
    return s


@pytest.fixture(scope="module")
def small_set(badnets) -> TrainingSet:
    """400 poisoned-training-set images of the BadNets demo (about 10% poisoned)."""
    pool = defense_pool(badnets, 100)
    return poisoned_training_set(badnets, pool, subset=400, seed=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- DBD -------------------------------------------------------------------------------------------------


def test_training_set_leaves_out_the_held_out_pool_and_knows_the_poison(badnets, small_set):
    pool = defense_pool(badnets, 100)
    full = poisoned_training_set(badnets, pool)
    held_out = set(badnets.split[1][pool.index[:pool.n_held_out]].tolist())
    left_out = set(badnets.split[1].tolist()) if not badnets.pool_in_training else held_out
    assert held_out <= left_out  # the whole pool when the suspect never trained on it (the demo bundle)
    assert len(full) == len(badnets.data.train) - len(left_out)
    assert not left_out & set(full.index.tolist())
    assert set(full.index[full.poisoned].tolist()) == set(badnets.poisoned_train().poison_idx.tolist())
    assert (full.y[full.poisoned] == 0).all()  # BadNets relabels to the target
    assert 0.05 < small_set.poison_rate < 0.15


def test_simclr_augment_gives_distinct_views_in_range():
    x = torch.rand(16, 3, 28, 28)
    v1, v2 = simclr_augment(x, _gen(0)), simclr_augment(x, _gen(1))
    assert v1.shape == x.shape and v1.min() >= 0 and v1.max() <= 1
    assert (v1 - v2).abs().mean() > 0.01
    assert simclr_augment(torch.rand(4, 1, 20, 20), _gen(0)).shape == (4, 1, 20, 20)


def test_nt_xent_is_low_for_matching_views():
    z = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    other = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    assert nt_xent(z, z, 0.5) < nt_xent(z, other, 0.5) - 0.5


def test_simclr_stage_loss_decreases(badnets, small_set):
    torch.manual_seed(0)
    model = reinitialize(copy.deepcopy(badnets.model))
    proj = ProjectionHead(model.linear.in_features)
    rows = simclr_train(model, proj, small_set.x[:192], "cpu", epochs=5, batch_size=64, lr=0.4, tau=0.5,
                        schedule_epochs=0, gen=_gen())
    assert len(rows) == 5
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, rows


def test_sce_is_robust_loss():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([0, 0])
    loss = sce_loss(logits, y, 0.1, 1.0, reduction="none")
    assert loss[0] < 0.1 and loss[1] > 9.0  # RCE = 9.21 (1 - p_y)


def _warm_head(backbone_model, data: TrainingSet, epochs: int = 4):
    torch.manual_seed(0)
    model = copy.deepcopy(backbone_model)
    model.linear.reset_parameters()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rows = warmup_train(model, opt, data, "cpu", epochs, 128, 0.1, 1.0, "crop", _gen())
    return model, rows


def test_warmup_trains_only_the_head_and_split_drops_the_poisoned_samples(clean, badnets, small_set):
    """With content features (the clean demo model's backbone, standing in for a converged SimCLR backbone) the
    SCE head cannot fit the relabelled poisoned samples, so they land in the dropped high-loss half, as DBD
    predicts; with the backdoored model's own supervised backbone they do not (the paper's motivation)."""
    model, rows = _warm_head(clean.model, small_set)
    assert rows[-1]["sce_loss"] < rows[0]["sce_loss"]
    before = {k: v for k, v in clean.model.named_parameters() if not k.startswith("linear")}
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the backbone is frozen
    _, labelled = sce_split(model, small_set, "cpu", 0.5, 0.1, 1.0, "crop", _gen())
    good = split_quality(~labelled, small_set.poisoned)
    assert labelled.sum() == 200
    assert good["recall"] > 0.9 and good["precision"] > 1.5 * small_set.poison_rate, good

    model_b, _ = _warm_head(badnets.model, small_set)
    _, labelled_b = sce_split(model_b, small_set, "cpu", 0.5, 0.1, 1.0, "crop", _gen())
    bad = split_quality(~labelled_b, small_set.poisoned)
    assert bad["recall"] < good["recall"] - 0.15 and bad["poisoned_kept"] > good["poisoned_kept"], (good, bad)


def test_mixmatch_fine_tunes_the_whole_model(clean, small_set):
    model, _ = _warm_head(clean.model, small_set, epochs=1)
    labelled = torch.zeros(len(small_set), dtype=torch.bool)
    labelled[:200] = True
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=0.002)
    res = mixmatch_epoch(model, opt, small_set, labelled, "cpu", iterations=4, batch_size=32, T=0.5, mix_alpha=0.75,
                         lambda_u=15.0, rampup=10, t0=2.0, augment="crop", gen=_gen())
    assert res["lambda_u"] == pytest.approx(15.0 * (2.0 + 3 / 4) / 10)
    assert res["loss_u"] >= 0 and res["loss_x"] > 0
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any(k.startswith("conv1") for k in changed) and any(k.startswith("linear") for k in changed)


def test_lambda_u_ramp():
    assert lambda_u_at(0, 15, 190) == 0
    assert lambda_u_at(95, 15, 190) == pytest.approx(7.5)
    assert lambda_u_at(500, 15, 190) == 15
    assert lambda_u_at(0, 15, 0) == 15


# --- CBD -------------------------------------------------------------------------------------------------


def test_cbd_weights_formula():
    w = cbd_weights(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert w.mean() == pytest.approx(1.0)
    assert w[0] == pytest.approx(0.0, abs=1e-6) and w[2] == pytest.approx(2 * w[1])
    assert lr_at(19, 100, 0.1) == 0.1 and lr_at(20, 100, 0.1) == pytest.approx(0.01)
    assert lr_at(70, 100, 0.1) == pytest.approx(0.001)


def test_fb_stage_fits_the_poisoned_set(badnets, small_set):
    torch.manual_seed(0)
    fb = reinitialize(copy.deepcopy(badnets.model))
    losses = train_backdoored(fb, small_set, "cpu", CBDParams(steps_b=0, epochs_b=3, batch_size=64, augment="none"), _gen())
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_fb_budget_is_counted_in_steps(badnets, small_set):
    """steps_b is the number of optimiser steps f_B takes, whatever the training set's size (issue 13)."""
    from defenses.cbd import batches_per_epoch, fb_schedule

    per_epoch = batches_per_epoch(len(small_set), 64)
    p = CBDParams(steps_b=per_epoch + 2, batch_size=64, augment="none")
    assert fb_schedule(p, per_epoch) == (2, per_epoch + 2)
    assert fb_schedule(CBDParams(steps_b=0, epochs_b=4), 10) == (4, 40)
    assert CBDParams().steps_b == 3910  # the official 5 CIFAR-10 epochs in batches of 64
    seen = []
    fb = reinitialize(copy.deepcopy(badnets.model))
    train_backdoored(fb, small_set, "cpu", p, _gen(), tick=lambda f, msg: seen.append((f, msg)))
    assert len(seen) == per_epoch + 2 and seen[-1][0] == 1.0
    assert f"step {per_epoch + 2}/{per_epoch + 2}" in seen[-1][1]


def test_cbd_weights_are_low_on_poisoned_samples_and_mi_penalty_trains(badnets, small_set):
    """With a backdoored f_B (here the demo suspect itself) the poisoned samples get weights near 0, as CBD predicts."""
    torch.manual_seed(0)
    fb = copy.deepcopy(badnets.model).eval()
    fc = reinitialize(copy.deepcopy(badnets.model))
    p = CBDParams(batch_size=100, augment="none")
    d = head(badnets.model).in_features
    disc = MIDiscriminator(d, d, dropout=p.disc_dropout, scale=p.mi_scale)
    opt = torch.optim.SGD(fc.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=p.disc_lr)
    res = train_deconfounded_epoch(fc, fb, disc, opt, disc_opt, small_set, "cpu", p, _gen())
    stats = weight_stats(res["weights"], small_set.poisoned)
    assert stats["w_poisoned_mean"] < 0.3 * stats["w_clean_mean"], stats
    assert stats["weight_auroc"] > 0.9
    assert res["mi"] is not None and res["mi_disc"] is not None
    for lin in (disc.l_in, disc.l_out):  # spectrally normalised critic
        assert float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2)) == pytest.approx(1.0, abs=1e-3)


def test_cbd_augmentation_follows_the_suspects_card():
    assert training_augment("suspect", {"training": {"augment": "crop"}}) == "crop"
    assert training_augment("suspect", {"training": {"augment": "none"}}) == "none"
    assert training_augment("suspect", {}) == "crop-flip"  # unknown: the official CIFAR choice
    assert training_augment("none", {"training": {"augment": "crop"}}) == "none"  # an explicit choice stands


def test_mi_discriminator_detects_dependence():
    torch.manual_seed(0)
    disc = MIDiscriminator(8, 8, dropout=0.0, scale=1.0)
    opt = torch.optim.Adam(disc.parameters(), lr=0.01)
    r = torch.randn(256, 8)
    for _ in range(60):
        mi = disc(r, r + 0.1 * torch.randn_like(r))
        opt.zero_grad()
        (-mi).backward()
        opt.step()
        disc.spectral_normalise()
    with torch.no_grad():
        dependent = disc(r, r + 0.1 * torch.randn_like(r))
        independent = disc(r, torch.randn_like(r))
    assert dependent > independent + 0.1


# --- pipelines, storage, cancellation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A run store with one finished DBD and one finished CBD run on the BadNets demo (tiny budgets)."""
    store = RunStore(tmp_path_factory.mktemp("runs"))
    ids = {}
    for name, overrides in (("dbd", TINY_DBD), ("cbd", TINY_CBD)):
        ids[name] = create_run(store, name, "demo:badnets", "quick", overrides, pool_size=100)
        assert execute(store, ids[name]) == "finished", store.get(ids[name]).error
    return store, ids


def test_dbd_pipeline_stores_its_backbone_and_reuses_it(finished_runs):
    store, ids = finished_runs
    first = ids["dbd"]
    folder = store.root / first
    assert (folder / f"{BACKBONE_FILE}.safetensors").is_file()
    report = store.report(first)
    assert f"{BACKBONE_FILE}.safetensors" in report["files"]
    split = report["curves"]["split"]
    assert len(split) == 1 and 0 <= split[0]["precision"] <= 1 and 0 <= split[0]["recall"] <= 1
    assert report["artifacts"]["loss_histograms"]["series"]
    assert "simclr" in report["curves"] and report["asr"] is not None
    n, steps = report["artifacts"]["n_train"], report["artifacts"]["stage_steps"]
    p = report["params"]
    assert steps == {"simclr": p["simclr_epochs"] * max(1, n // p["simclr_batch_size"]),
                     "warmup": p["warmup_epochs"] * -(-n // p["warmup_batch_size"]),
                     "semi": p["semi_epochs"] * p["iterations"]}

    # the quick preset's cosine schedule ends stage 3 at a learning rate of 0; the official one stays constant
    assert p["semi_schedule"] == "cosine" and report["curves"]["semi"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)

    second = create_run(store, "dbd", "demo:badnets", "quick",
                        {**TINY_DBD, "reuse_backbone_from": first, "semi_schedule": "constant"}, pool_size=100)
    assert execute(store, second) == "finished", store.get(second).error
    rep2 = store.report(second)
    assert rep2["curves"]["semi"][-1]["lr"] == pytest.approx(rep2["params"]["lr"])
    assert rep2["artifacts"]["stage1"]["reused_from"] == str(folder / f"{BACKBONE_FILE}.safetensors")
    assert "simclr" not in rep2["curves"]
    a = load_file(str(folder / f"{BACKBONE_FILE}.safetensors"))
    b = load_file(str(store.root / second / f"{BACKBONE_FILE}.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert run_file(str(folder), f"{BACKBONE_FILE}.safetensors") == folder / f"{BACKBONE_FILE}.safetensors"
    with pytest.raises(FileNotFoundError):
        run_file("no-such-run", f"{BACKBONE_FILE}.safetensors")
    blended = suspects.load("demo:blended")
    model = copy.deepcopy(blended.model)
    with pytest.raises(ValueError, match="another suspect"):
        load_backbone(str(folder), model, ProjectionHead(model.linear.in_features), suspect_fingerprint(blended))


def test_cbd_pipeline_tiny_budget(finished_runs):
    store, ids = finished_runs
    report = store.report(ids["cbd"])
    arts = report["artifacts"]
    assert arts["n_train"] == 300 and arts["disentangle"] is True
    assert arts["augment"] == suspects.load("demo:badnets").card["training"]["augment"]  # f_B trains as the attacker did
    series = arts["weight_histograms"]["series"]
    assert len(series) == 1 and sum(series[0]["clean"]) == pytest.approx(1.0)
    assert {"w_clean_mean", "w_poisoned_mean"} <= set(report["curves"]["weights"][0])
    assert report["ba"] is not None and report["files"] == []
    card = suspects.load(str(store.root / ids["cbd"])).card
    assert card["provenance"]["defense"] == "cbd"


def test_defenses_page_draws_poisoned_vs_clean(finished_runs, monkeypatch):
    from streamlit.testing.v1 import AppTest

    store, _ = finished_runs
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(store.root))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py"), default_timeout=240)
    at.query_params["suspect"] = "demo:badnets"
    at.run()
    at.switch_page("views/defenses.py").run()
    assert not at.exception, at.exception
    titles = [s.value for s in at.subheader]
    dbd, cbd = "Decoupling-based Backdoor Defense (DBD)", "Causality-inspired Backdoor Defense (CBD)"
    assert dbd in titles and cbd in titles and titles.index(dbd) + 1 == titles.index(cbd), titles
    assert sum("Poisoned vs. clean" in c.value for c in at.caption) == 2  # DBD's loss and CBD's weight histograms


@pytest.mark.parametrize("name,overrides", [("dbd", TINY_DBD), ("cbd", TINY_CBD)])
def test_cancellation_between_steps(badnets, name, overrides):
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    messages = []
    with pytest.raises(Cancelled):
        run_defense(name, badnets, "quick", overrides, pool_size=100, should_stop=stop,
                    progress=lambda f, m, d: messages.append(m))
    assert calls["n"] == 4  # stopped at the first check after the request
    assert any(m.startswith("stage 1") for m in messages)  # ... which came inside the first stage's steps


def test_cancelled_job_is_recorded(tmp_path):
    store = RunStore(tmp_path / "runs")
    rid = create_run(store, "cbd", "demo:badnets", "quick", TINY_CBD, pool_size=100)
    store.request_cancel(rid)  # queued: cancelled at once
    assert store.get(rid).status == "cancelled"
    rid = create_run(store, "dbd", "demo:badnets", "quick", TINY_DBD, pool_size=100, pid=1)
    store.request_cancel(rid)  # running: the worker stops at its next step
    assert execute(store, rid) == "cancelled" and store.get(rid).status == "cancelled"
    assert not (store.root / rid).exists()


def test_training_time_defenses_need_the_poisoned_set(clean):
    for name in ("dbd", "cbd"):
        d = get_defense(name)
        assert d.threat.poisoned_training_set
        with pytest.raises(ValueError, match="poisoned training set"):
            d.check_applicable(clean)
