"""Issue 30, "every view and page works on them": a tiny suspect of each new attack (BppAttack at a 1% poisoning
rate, Adaptive-Blend, Adaptive-Patch, TrojanNN, input-aware) and of BadNets all-to-all, trained for two steps at width
4 on the demo data; every dashboard page renders on each with its main content, and every analysis view runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import suspects
from analysis.reverse import SAMPLE_SPECIFIC_TRIGGERS
from suspects.metrics import asr_rule

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")

#: suspect name -> the `backdoor-lens train` flags of its attack (the generators and TrojanNN's patch kept cheap)
ATTACKS = {
    "bppattack": ["--attack", "bppattack", "--poison-rate", "0.01"],  # a low poisoning rate: 100 of 10,000 images
    "adaptive_blend": ["--attack", "adaptive_blend"],
    "adaptive_patch": ["--attack", "adaptive_patch"],
    "trojannn": ["--attack", "trojannn", "--attack-param", "iters=5"],
    "inputaware": ["--attack", "inputaware", "--attack-param", "gen_width=4", "--attack-param", "mask_epochs=1"],
    "badnets_a2a": ["--attack", "badnets", "--mapping", "all-to-all"],
}
#: whole-image triggers: the Grad-CAM page shows the map shift instead of the trigger-attention share
WHOLE_IMAGE = {"bppattack", "adaptive_blend"}
#: what the pages must never say about an all-to-all suspect (one target class, target-class images left out)
SINGLE_TARGET = ("target class 0", "target 0 (", "target-class images left out", "the target class is excluded")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lens(tmp_path_factory):
    """A run store holding one tiny suspect per attack under uploads/ (where the suspect picker finds them)."""
    from backdoor_lens.cli import main

    root = tmp_path_factory.mktemp("lens-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BACKDOOR_LENS_RUNS", str(root))
        folders = {}
        for name, flags in ATTACKS.items():
            out = root / "uploads" / name
            argv = ["train", "--data", "demo", "--width", "4", "--epochs", "1", "--max-steps", "2", "--batch-size",
                    "32", "--seed", "0", "--quiet", "--out", str(out), *flags]
            assert main(argv) == 0, name
            folders[name] = str(out)
        yield root, folders


def texts(at) -> list[str]:
    return [str(e.value) for e in [*at.title, *at.caption, *at.markdown, *at.info, *at.warning, *at.error,
                                     *at.subheader]]


def open_app(ref: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params["suspect"] = ref
    at.session_state["sample_size"] = 50
    at.run()
    assert not at.exception, at.exception
    return at


def visit(at, page: str):
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, (page, at.exception)
    return at


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_page_renders_on_the_suspect(name, lens):
    root, folders = lens
    s = suspects.load(folders[name])
    trig = s.trigger
    a2a = trig.mapping == "all-to-all"
    assert trig.name == ATTACKS[name][1] and a2a == (name == "badnets_a2a")
    said: list[str] = []

    at = open_app(folders[name])  # Overview
    assert name in at.title[0].value
    assert [m.label for m in at.metric] == ["BA (benign accuracy)", "ASR (attack success rate)",
                                            "RA (robust accuracy)"]
    assert abs(float(at.metric[1].value.rstrip("%")) - 100 * s.card["metrics"]["asr"]) < 0.06
    attack_row = at.table[0].value.set_index("field").loc["attack", "value"]
    assert ("all-to-all" in attack_row) == a2a and (("target 0" in attack_row) != a2a)
    assert len(at.get("image")) == 2 * 8  # eight clean examples and their triggered copies
    said += texts(at)

    visit(at, "gradcam")
    labels = [m.label for m in at.metric]
    if name in WHOLE_IMAGE:
        assert "Map shift, clean → triggered" in labels and any("says nothing" in i.value for i in at.info)
    else:
        assert "Trigger-attention share, triggered inputs" in labels and "Footprint share of the image" in labels
    assert any("own trigger pixels" in c.value for c in at.caption) == trig.sample_specific
    assert at.selectbox(key="cam_reference").value == "demo:clean"  # the 2 x 2 grid with the clean demo model
    at.selectbox(key="cam_target").set_value("target").run()  # explain the attack's label (all-to-all: y + 1)
    assert not at.exception, at.exception
    said += texts(at)

    visit(at, "activations")
    assert len(at.get("plotly_chart")) == 3 and len(at.dataframe) >= 1
    visit(at, "features")
    metrics = {m.label: float(m.value) for m in at.metric}
    assert 0.0 <= metrics["Poisoned-cluster separation (2-D)"] <= 1.0 and len(at.get("plotly_chart")) == 1
    assert any("All-to-all attack" in c.value for c in at.caption) == a2a
    said += texts(at)

    visit(at, "shortcuts")
    at.button(key="run_ablation").click().run()
    assert not at.exception, at.exception
    assert "Critical block" in [m.label for m in at.metric] and len(at.get("plotly_chart")) == 1
    assert any(asr_rule(trig) in c.value for c in at.caption)  # the ASR's own image set and success rule
    said += texts(at)

    visit(at, "detection")
    at.number_input[0].set_value(10)
    at.number_input[1].set_value(1)
    at.button[0].click().run()  # the form's "Scan all classes": 10 pool images, one epoch per class
    assert not at.exception, at.exception
    page = texts(at)
    assert any("Verdict:" in t for t in page) and len(at.get("plotly_chart")) == 2
    if a2a:
        assert any("is all-to-all" in i.value and "says nothing about this backdoor" in i.value for i in at.info)
        assert any("no single target class" in m.value for m in at.markdown)
    else:
        assert any(f"Known attack: **{trig.name}**, target class 0" in m.value for m in at.markdown)
    if name in SAMPLE_SPECIFIC_TRIGGERS:  # the page says what Neural Cleanse cannot see
        assert any("sample-specific trigger" in i.value for i in at.info)
    if name in WHOLE_IMAGE:
        assert any("these shares say nothing here" in m.value for m in at.markdown)
    said += page

    visit(at, "screening")
    at.number_input(key="scr_pool").set_value(20)
    at.number_input(key="scr_limit").set_value(20)
    at.button(key="scr_run").click().run()
    assert not at.exception, at.exception
    values = {m.label: m.value for m in at.metric}
    assert 0.0 <= float(values["AUROC"]) <= 1.0 and len(at.get("plotly_chart")) == 2
    assert any(("all-to-all: every class" if a2a else "all-to-one: target-class images left out") in c.value
               for c in at.caption)
    said += texts(at)

    visit(at, "defenses")
    assert "Fine-tuning" in [s.value for s in at.subheader]
    visit(at, "compare")
    assert any("No finished run" in i.value for i in at.info) or at.get("plotly_chart")
    if a2a:
        wrong = [t for t in said if any(p in t for p in SINGLE_TARGET)]
        assert not wrong, wrong


@pytest.mark.filterwarnings("ignore::UserWarning:umap")
@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_analysis_view_runs_on_the_suspect(name, lens):
    """The library views the pages call, on each suspect: Grad-CAM against the attack's labels, activation norms,
    the feature space (UMAP on 30 points), the skip ablation, Neural Cleanse with a one-epoch budget and every
    screener on 20 test images."""
    from analysis.activations import activation_stats
    from analysis.features import embed, feature_set
    from analysis.gradcam import compare_gradcam
    from analysis.reverse import ScanConfig, known_footprint_share, scan_suspect
    from analysis.samples import paired_sample
    from analysis.screening import list_screeners, screen_suspect
    from analysis.shortcuts import ablation_curves

    s = suspects.load(lens[1][name])
    trig, n_classes = s.trigger, s.num_classes
    smp = paired_sample(s.test, trig, 8)
    expect = (smp.labels + 1) % n_classes if trig.mapping == "all-to-all" else torch.full_like(smp.labels, 0)
    assert torch.equal(smp.attack_labels, expect)
    cams = compare_gradcam(s.model, smp, trig, target_kind="target")
    assert cams.triggered_cams.shape == (8, 28, 28) and cams.sample_specific == trig.sample_specific
    assert cams.whole_image == (name in WHOLE_IMAGE)
    assert np.isfinite(cams.triggered_cams).all() and 0.0 < cams.footprint_fraction <= 1.0

    stats = activation_stats(s.model, smp.clean, smp.triggered)
    assert len(stats.layers) > 0 and len(stats.ranking(layer=None, top=5)) == 5

    fs = feature_set(s, n_clean=20, n_triggered=10, n_train=10)
    assert fs.features.shape[0] == len(fs.kind) and {"clean test", "triggered test"} <= set(fs.kind)
    assert "poisoned train" in set(fs.kind) and fs.poisoned.sum() == 10 + (fs.kind == "poisoned train").sum()
    emb = embed(fs, "UMAP", n_neighbors=5)
    assert emb.points.shape == (len(fs.kind), 2) and np.isfinite(emb.points).all()

    abl = ablation_curves(s.model, s.test, trig, 20, gammas=(1.0, 0.0))
    assert abl.n_triggered == 20 and set(abl.table.gamma) == {0.0, 1.0}

    scan = scan_suspect(s, ScanConfig(n_images=20, steps=1))
    assert scan.masks.shape == (n_classes, 28, 28) and len(scan.l1) == n_classes
    share = known_footprint_share(trig, smp.clean if trig.sample_specific else None)
    assert (share > 0.5) == (name in WHOLE_IMAGE)

    for method in list_screeners():
        res = screen_suspect(s, method, n_pool=20, limit=20)
        triggered = int(trig.test_mask(s.test.labels[:20]).sum())
        assert res.n_clean == 20 and res.n_triggered == triggered and 0.0 <= res.auroc <= 1.0, method
        assert triggered == (20 if trig.mapping == "all-to-all" else int((s.test.labels[:20] != 0).sum()))


def test_a_defense_run_shows_on_defenses_and_compare(lens):
    """A finished defense run (one fine-tuning step) of the input-aware suspect (its trigger is two generators stored
    in the card): its card on the Defenses page, Compare's table and every side-by-side view, the HTML report, and
    the repaired model (which carries the suspect's trigger, generators included) on Overview and Grad-CAM."""
    from backdoor_lens.cli import main
    from runs.report import html_report
    from runs.store import RunStore

    root, folders = lens
    name = "inputaware"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BACKDOOR_LENS_RUNS", str(root))
        assert main(["defend", "finetune", folders[name], "--preset", "quick", "--set", "steps=1", "--pool-size", "20",
                     "--measure", "subset:32", "--no-estimate", "--json", "--runs", str(root)]) == 0
        at = visit(open_app(folders[name]), "defenses")
        assert {"BA", "ASR", "RA", "DER"} <= {m.label for m in at.metric}
        visit(at, "compare")
        assert any(s.value == "Stored runs (1)" for s in at.subheader)
        right = at.selectbox(key="cmp_right")
        assert right.value != folders[name]  # the repaired model beside the suspect
        shares = [m for m in at.metric if m.label == "Trigger-attention share, triggered inputs"]
        assert len(shares) == 2
        for view in ("activations", "features", "ablation"):
            at.segmented_control(key="cmp_view").set_value(view).run()
            assert not at.exception, (view, at.exception)
            assert at.get("plotly_chart"), view
        report = html_report(folders[name], store=RunStore(root), n=16)
        assert "finetune" in report and "<html" in report.lower()
        repaired = right.value
        assert suspects.load(repaired).trigger.spec() == suspects.load(folders[name]).trigger.spec()
        at = open_app(repaired)
        assert "finetune" in at.title[0].value
        visit(at, "gradcam")
        assert any(m.label.startswith("Trigger-attention share") for m in at.metric)
