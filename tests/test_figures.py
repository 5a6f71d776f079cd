"""Views computed once and drawn once (issue 11): the figure functions of analysis.figures, and one view (skip
ablation) drawn with the same data by its page, the Compare page's side by side and the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

import suspects
from analysis.activations import activation_stats, activation_summary
from analysis.features import Embedding, embed, feature_set
from analysis.figures import (
    ablation_figure,
    activations_figure,
    anomaly_figure,
    embedding_figure,
    lines_figure,
    mask_grid,
    mask_norm_figure,
    mask_pattern_tile,
    mask_tiles,
    norm_box_figure,
    norm_histogram_figure,
    progress_axis,
    scale_groups,
)
from analysis.reverse import ReverseResult, anomaly_indices
from analysis.samples import paired_sample
from analysis.shortcuts import ablation_curves
from runs.compare import side_by_side
from runs.report import html_report
from runs.store import RunStore

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
N = 40

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


@pytest.fixture(scope="module")
def ablation(badnets):
    return ablation_curves(badnets.model.eval(), badnets.test, badnets.trigger, N, gammas=(1.0, 0.5, 0.0))


def test_ablation_figure_one_model_and_several(ablation):
    blocks = list(dict.fromkeys(ablation.table.block))
    one = ablation_figure({"m": ablation})
    assert len(one.data) == 2 * len(blocks)
    assert [a.text for a in one.layout.annotations] == ["BA (clean test images)", "ASR (triggered test images)"]
    crit = [t for t in one.data if t.name == f"{ablation.critical_block} (critical)"]
    assert len(crit) == 2 and crit[0].line.width == 4
    curve = ablation.curve(blocks[0])
    first_ba = next(t for t in one.data if t.legendgroup == blocks[0] and t.xaxis == "x")
    assert list(first_ba.x) == curve.gamma.tolist() and list(first_ba.y) == curve.ba.tolist()
    two = ablation_figure({"a": ablation, "b": ablation})
    assert len(two.data) == 4 * len(blocks)
    assert {a.text for a in two.layout.annotations} >= {"a", "b", "BA", "ASR"}
    assert sum(t.showlegend is not False for t in two.data) == len(blocks)  # one legend entry per block


def test_activation_and_feature_figures(badnets):
    smp = paired_sample(badnets.test, badnets.trigger, 20)
    stats = activation_stats(badnets.model, smp.clean, smp.triggered)
    summary = activation_summary(badnets.model, smp)
    pd.testing.assert_frame_equal(summary, stats.layer_summary())
    one = activations_figure({"m": summary})
    assert list(one.data[0].x) == summary.layer.tolist() and np.allclose(one.data[0].y, summary.top_linf_bias)
    assert [t.name for t in activations_figure({"a": summary, "b": summary}).data] == ["a", "b"]
    layer = stats.layers[-1]
    hist = norm_histogram_figure(stats, layer, "linf")
    assert [t.name for t in hist.data] == ["clean", "triggered"]
    assert np.allclose(hist.data[1].x, stats.triggered[layer][:, :, 2].mean(0))
    box = norm_box_figure(stats, "l1")
    assert len(box.data) == 2 and len(box.data[0].y) == sum(stats.clean[ly].shape[1] for ly in stats.layers)

    fs = feature_set(badnets, n_clean=30, n_triggered=10)
    emb = embed(fs, "PCA")
    assert isinstance(emb, Embedding) and emb.points.shape == (40, 2) and emb.separation["n_poisoned"] == 10
    fig = embedding_figure({"m": emb}, badnets.classes, lasso=True)
    assert fig.layout.dragmode == "lasso"
    idx = np.concatenate([np.asarray(t.customdata)[:, 0] for t in fig.data])
    assert sorted(idx.tolist()) == list(range(40))  # a lasso selection gives the points' own indices
    facets = embedding_figure({"a": emb, "b": emb}, badnets.classes)
    assert {a.text for a in facets.layout.annotations} == {"a", "b"} and facets.layout.dragmode is None


def test_detection_figures():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 6, 5)).astype(np.float32) * 0.5
    l1 = np.array([30.0, 31.0, 2.0, 29.0])
    anomaly = anomaly_indices(l1)
    result = ReverseResult(masks, rng.random((4, 3, 6, 5)).astype(np.float32), l1, np.array([0.1, 0.2, 1.0, 0.1]),
                           anomaly, [2], 2.0)
    classes = ["a", "b", "c", "d"]
    bars = anomaly_figure(result, classes)
    assert list(bars.data[0].x) == ["0: a", "1: b", "2: c", "3: d"] and np.allclose(bars.data[0].y, anomaly)
    assert bars.data[0].marker.color[2] != bars.data[0].marker.color[0] and bars.layout.shapes[0].y0 == 2.0
    assert np.allclose(mask_norm_figure(result, classes).data[0].y, l1)
    mask, stamp = mask_tiles(result, 1)
    assert mask.shape == (1, 6, 5) and mask.max() == pytest.approx(1.0)
    assert np.allclose(stamp, result.patterns[1] * masks[1][None])
    grid = mask_grid(result, scale=2, gap=1)
    assert grid.shape == (2 * 12 + 1, 4 * 10 + 3, 3) and grid.dtype == np.uint8
    # the most anomalous class (2) comes first: its tile is its own peak-scaled mask
    assert np.array_equal(grid[:12:2, :10:2, 0], (mask_tiles(result, 2)[0][0] * 255).round().astype(np.uint8))
    # issue 12 item 10: one same-size cell per class, mask | pattern | m·p side by side
    tiles = [mask_pattern_tile(result, k, scale=2, gap=1) for k in range(4)]
    assert {t.shape for t in tiles} == {(12, 3 * 10 + 2, 3)}
    assert np.array_equal(tiles[3][:, 11:21:2][::2], (np.clip(result.patterns[3], 0, 1) * 255).round()
                          .astype(np.uint8).transpose(1, 2, 0))


def test_defense_curves_get_an_axis_per_scale_and_steps_on_x():
    """Issue 12 item 8: delta_l1 (~255) does not share an axis with losses (~0.3); the live chart's x axis counts
    the epochs its messages name, else seconds."""
    df = pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.4, 0.3, 0.25], "ba": [0.8, 0.85, 0.9],
                       "delta_l1": [250.0, 255.0, 260.0]})
    assert scale_groups(df, ["loss", "ba", "delta_l1"]) == [["loss", "ba"], ["delta_l1"]]
    fig = lines_figure(df, "epoch", ["loss", "ba", "delta_l1"], "t", "epoch")
    axes = {t.name: t.yaxis for t in fig.data}
    assert axes["loss"] == axes["ba"] != axes["delta_l1"]
    events = [{"t": 10.0 + i, "message": f"fine-tuning: epoch {i + 1}/3"} for i in range(3)]
    assert progress_axis(events) == ([1, 2, 3], "epoch")
    mixed = [{"t": 5.0, "message": "stage 1/3: warm-up"}, {"t": 7.5, "message": "outer epoch 1/2"}]
    assert progress_axis(mixed) == ([0.0, 2.5], "seconds since start")


def _report_data(html: str) -> list[list[dict]]:
    """The ``data`` argument of every ``Plotly.newPlot`` call in an HTML page."""
    dec = json.JSONDecoder()
    out = []
    at = html.find("Plotly.newPlot(")
    while at >= 0:
        pos = at + len("Plotly.newPlot(")
        _, pos = dec.raw_decode(html, html.index('"', pos))  # the div id
        data, _ = dec.raw_decode(html, html.index("[", pos))
        out.append(data)
        at = html.find("Plotly.newPlot(", pos)
    return out


def test_page_compare_and_report_draw_the_same_ablation(badnets, tmp_path, monkeypatch):
    """One view, three places: the Skip-ablation page, the Compare page's side by side (one model) and the HTML
    report (the suspect alone) call ablation_curves and ablation_figure, so they show the same figure data."""
    store = RunStore(tmp_path / "runs")
    rid = store.create("finetune", "demo:badnets", "quick", {}, 100, 0)  # the Compare page needs one stored run
    store.finish(rid, {"defense": "finetune", "preset": "quick", "pool_size": 100, "ba_before": 0.9,
                       "asr_before": 1.0, "ba": 0.9, "asr": 1.0, "ra": 0.0, "der": 0.5, "seconds": 1.0,
                       "device": "cpu", "finished": "2026-01-01T00:00:00+00:00"}, badnets)
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(store.root))
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params["suspect"] = "demo:badnets"
    at.session_state["sample_size"] = N
    at.run()
    at.switch_page("views/shortcuts.py").run()
    at.button(key="run_ablation").click().run()  # the page computes it on request (issue 12 item 5)
    assert not at.exception, at.exception
    page = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]

    at.switch_page("views/compare.py").run()
    at.selectbox(key="cmp_right").set_value("demo:badnets").run()  # both sides the suspect: one model shown
    at.segmented_control(key="cmp_view").set_value("ablation").run()
    assert not at.exception, at.exception
    compare = json.loads(at.get("plotly_chart")[-1].proto.spec)["data"]

    empty = RunStore(tmp_path / "no-runs")  # no run: the report shows the suspect alone
    html = html_report("demo:badnets", store=empty, n=N, parts=("ablation",))
    (report,) = _report_data(html)

    sbs = side_by_side({"suspect": badnets}, badnets, n=N, parts=("ablation",))
    direct = json.loads(ablation_figure(sbs.ablation).to_json())["data"]
    assert len(page) == 16 and any("(critical)" in t["name"] for t in page)
    assert page == compare == report == direct


def test_skip_ablation_curves_match_the_model_with_a_scaled_skip(badnets, ablation):
    """ablation_curves runs the stem once and the blocks after the ablated one per gamma (the model interface);
    the numbers equal those of the whole model with that skip scaled."""
    from suspects.models import set_skip_gamma

    smp = paired_sample(badnets.test, badnets.trigger, N)
    clean_idx = paired_sample(badnets.test, None, N).index
    model = badnets.model.eval()
    set_skip_gamma(model, "layer3.0", 0.5)
    try:
        with torch.no_grad():
            ba = (model(badnets.test.images(clean_idx)).argmax(1) == badnets.test.labels[clean_idx]).float().mean()
            asr = (model(smp.triggered).argmax(1) == smp.attack_labels).float().mean()
    finally:
        set_skip_gamma(model, "layer3.0", 1.0)
    row = ablation.table[(ablation.table.block == "layer3.0") & (ablation.table.gamma == 0.5)].iloc[0]
    assert row.ba == pytest.approx(float(ba)) and row.asr == pytest.approx(float(asr))
