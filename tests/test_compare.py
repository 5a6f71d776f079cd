"""Comparison of stored runs (issue 6): the run table, its Pareto front, filters, exports, charts, the side-by-side
analyses, the HTML report, the `compare` / `report` commands and the Compare page."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import suspects
from backdoor_lens.cli import main
from runs.compare import (
    COLUMN_DEFINITIONS,
    COLUMNS,
    PARTS,
    best_run,
    filter_runs,
    format_table,
    gradcam_grid,
    group_runs,
    metric_bars_figure,
    pareto_front,
    runs_table,
    same_suspect,
    side_by_side,
    table_csv,
    table_json,
    tradeoff_figure,
)
from runs.jobs import create_run, execute
from runs.published import published_for
from runs.report import figures_png, run_figures
from runs.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")

# (defense, ba, asr): finetune and shortcut tie, fineprune is dominated by both, anp trades BA for ASR
FAKE = [("finetune", 0.85, 0.05), ("anp", 0.80, 0.02), ("fineprune", 0.82, 0.10), ("shortcut", 0.85, 0.05)]


def _fake_report(defense: str, ba: float, asr: float) -> dict:
    return {"defense": defense, "preset": "quick", "pool_size": 300, "pool_split": {"train": 240, "held_out": 60},
            "ba_before": 0.9, "asr_before": 1.0, "ra_before": 0.0, "ba": ba, "asr": asr, "ra": 1 - asr - 0.05,
            "der": ((1.0 - asr) - max(0.0, 0.9 - ba) + 1) / 2, "seconds": 12.5, "device": "cpu (2 threads)",
            "finished": "2026-11-22T10:00:00+00:00"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory) -> RunStore:
    """Runs with known numbers (the demo model stands in for the repaired one), plus runs that must not be listed."""
    store = RunStore(tmp_path_factory.mktemp("fake-runs"))
    model = suspects.load("demo:badnets")
    for defense, ba, asr in FAKE:
        rid = store.create(defense, "demo:badnets", "quick", {"steps": 4} if defense == "finetune" else {}, 300, 0)
        store.finish(rid, _fake_report(defense, ba, asr), model)
    other = store.create("finetune", "demo:blended", "quick", {}, 300, 0)
    store.finish(other, _fake_report("finetune", 0.99, 0.0), model)
    failed = store.create("anp", "demo:badnets", "quick", {}, 300, 0)
    store.fail(failed, "boom")
    return store


@pytest.fixture(scope="module")
def real_store(tmp_path_factory) -> RunStore:
    """One real, tiny defense run on the BadNets demo suspect (fine-tuning, 1 epoch on 100 pool images)."""
    store = RunStore(tmp_path_factory.mktemp("real-runs"))
    rid = create_run(store, "finetune", "demo:badnets", "quick", {"steps": 2, "lr": 0.05}, pool_size=100,
                     pid=os.getpid())
    assert execute(store, rid) == "finished", store.get(rid).error
    return store


def test_pareto_front_marks_the_undominated_points():
    front = pareto_front([0.85, 0.80, 0.82, 0.85, 0.70, None], [0.05, 0.02, 0.10, 0.05, 0.01, 0.0])
    assert front.tolist() == [True, True, False, True, True, False]
    assert pareto_front([0.9, 0.8], [None, None]).tolist() == [True, False]  # no trigger: the highest BA
    assert pareto_front([], []).tolist() == []


def test_a_defense_that_gave_up_is_marked_and_never_on_the_front(tmp_path):
    """l_inf pruning returns the suspect unchanged when no few channels carry the trigger (``failed: true``): its BA
    is the highest of all, but an unchanged model is not a trade-off a user can pick."""
    store = RunStore(tmp_path / "runs")
    model = suspects.load("demo:badnets")
    for defense, ba, asr, failed in (("finetune", 0.85, 0.05, False), ("linf_prune", 0.9, 1.0, True),
                                     ("linf_prune", 0.84, 0.08, False)):
        rid = store.create(defense, "demo:badnets", "quick", {}, 300, 0)
        report = _fake_report(defense, ba, asr) | {"artifacts": {"failed": failed, "n_pruned": 0 if failed else 3}}
        store.finish(rid, report, model)
    table = runs_table(store, "demo:badnets")
    assert table.failed.tolist() == [False, True, False]  # newest first
    assert table.pareto.tolist() == [False, False, True]  # without the rule the unchanged model would lead it
    assert pareto_front(table.ba, table.asr).tolist() == [False, True, True]
    assert filter_runs(table, defenses=["linf_prune"]).pareto.tolist() == [True, False]
    text = format_table(table)
    assert any(line.startswith("x") and "linf_prune" in line for line in text.splitlines())
    assert "x failed: the defense reported that it failed" in text
    groups = group_runs(table)
    assert dict(zip(groups.defense, groups.n_failed, strict=True)) == {"finetune": 0, "linf_prune": 1}
    symbols = {t.name: list(t.marker.symbol) for t in tradeoff_figure(table).data if t.name in ("finetune", "linf_prune")}
    assert symbols == {"finetune": ["circle"], "linf_prune": ["circle", "x"]}


def test_runs_table_lists_the_suspects_finished_runs(fake_store):
    table = runs_table(fake_store, "demo:badnets")
    assert list(table.columns) == COLUMNS and set(COLUMNS) <= set(COLUMN_DEFINITIONS)
    assert sorted(table.defense) == sorted(d for d, _, _ in FAKE)  # not the blended run, not the failed one
    assert table.defense.tolist() == [d for d, _, _ in reversed(FAKE)]  # newest first
    front = dict(zip(table.defense, table.pareto, strict=True))
    assert front == {"finetune": True, "anp": True, "fineprune": False, "shortcut": True}
    row = table[table.defense == "finetune"].iloc[0]
    assert row.overrides == "steps=4" and row.clean_images == 300 and row.held_out == 60
    assert Path(row.run_dir).is_dir() and row.date.startswith("2026-11-22")
    assert best_run(table).defense in ("finetune", "shortcut")
    assert runs_table(fake_store, "demo:sig").empty


def test_same_suspect_compares_folders_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert same_suspect("suspect", str(tmp_path / "suspect"))
    assert same_suspect("demo:badnets", "demo:badnets") and not same_suspect("demo:badnets", "badnets")


def test_filters_recompute_the_front(fake_store):
    table = runs_table(fake_store, "demo:badnets")
    rest = filter_runs(table, defenses=["anp", "fineprune"])
    assert set(rest.defense) == {"anp", "fineprune"} and rest.pareto.all()  # fineprune has the best BA left
    assert filter_runs(table, min_ba=0.84).defense.tolist() == ["shortcut", "finetune"]
    assert filter_runs(table, max_asr=0.03).defense.tolist() == ["anp"]
    assert sorted(filter_runs(table, pareto_only=True).defense) == ["anp", "finetune", "shortcut"]
    assert filter_runs(table, presets=["paper"]).empty


def test_exports_keep_every_number_and_its_definition(fake_store):
    table = runs_table(fake_store, "demo:badnets")
    back = pd.read_csv(io.StringIO(table_csv(table)))
    assert back.run_id.tolist() == table.run_id.tolist()
    assert np.allclose(back.asr, table.asr) and back.pareto.tolist() == table.pareto.tolist()
    data = json.loads(table_json(table, "demo:badnets"))
    assert data["suspect"] == "demo:badnets" and len(data["runs"]) == len(FAKE)
    assert "excluded" in data["definitions"]["asr"] and set(data["definitions"]) == set(table.columns)
    text = format_table(table)
    starred = [line for line in text.splitlines() if line.startswith("*") and "quick" in line]
    assert len(starred) == 3 and "fineprune" not in "".join(starred)
    assert "DER: defense effectiveness rating" in text


def test_charts_show_the_front_and_the_suspect_before(fake_store):
    table = runs_table(fake_store, "demo:badnets")
    fig = tradeoff_figure(table)
    traces = {t.name: t for t in fig.data}
    front = traces["Pareto front"]
    assert list(front.x) == [0.02, 0.05, 0.05] and list(front.y) == [0.80, 0.85, 0.85]
    assert list(traces["suspect (before)"].x) == [1.0]
    bars = metric_bars_figure(table)
    titles = [a.text for a in bars.layout.annotations]
    assert titles == ["BA", "ASR", "RA", "DER"]
    assert [round(s.y0, 3) for s in bars.layout.shapes] == [0.9, 1.0, 0.0]  # the suspect before (no DER)


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("BROWSER_PATH"),
                    reason="no Chromium for kaleido")
def test_charts_export_as_png_offline(fake_store):
    pngs = figures_png(run_figures(runs_table(fake_store, "demo:badnets")), width=600, scale=1)
    assert set(pngs) == {"ba_vs_asr", "metrics"}
    from PIL import Image

    for data in pngs.values():
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(io.BytesIO(data)).size[0] == 600


def test_side_by_side_runs_every_analysis_on_the_same_images(real_store):
    table = runs_table(real_store, "demo:badnets")
    assert len(table) == 1 and table.defense[0] == "finetune" and table.pareto[0]
    base = suspects.load("demo:badnets")
    repaired = suspects.load(table.run_dir[0])
    sbs = side_by_side({"suspect": base, "repaired": repaired}, base, n=24, cam_images=4)
    assert not sbs.notes
    for part in PARTS:
        assert set(getattr(sbs, part)) == {"suspect", "repaired"}, part
    # fine-tuning changes every layer: the statistics of the two models differ, on the same sample
    assert not np.allclose(sbs.activations["suspect"].top_linf_bias, sbs.activations["repaired"].top_linf_bias)
    assert sbs.features["suspect"].points.shape == sbs.features["repaired"].points.shape == (24 + 12, 2)
    grid = gradcam_grid(sbs.sample, sbs.gradcam["suspect"], k=4, scale=2)
    assert grid.shape == (2 * 56 + 2, 4 * 56 + 3 * 2, 3) and grid.dtype == np.uint8
    assert sbs.ablation["repaired"].critical_block.startswith("layer")


def test_side_by_side_without_a_trigger_says_why():
    clean = suspects.load("demo:clean")
    sbs = side_by_side({"clean": clean}, clean, n=20, parts=("gradcam", "features"))
    assert "no trigger" in sbs.notes["gradcam"] and "clean" in sbs.features and not sbs.gradcam


def test_cli_compare_and_a_self_contained_report(real_store, tmp_path, capsys):
    root = str(real_store.root)
    assert main(["compare", "demo:badnets", "--runs", root, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    run_id = data["runs"][0]["run_id"]
    assert len(data["runs"]) == 1 and "benign accuracy" in data["definitions"]["ba"]
    assert main(["compare", "demo:badnets", "--runs", root, "--csv"]) == 0
    assert pd.read_csv(io.StringIO(capsys.readouterr().out)).run_id.tolist() == [run_id]
    assert main(["compare", "demo:badnets", "--runs", root]) == 0
    out = capsys.readouterr().out
    assert run_id in out and "ASR: attack success rate" in out
    assert main(["compare", "demo:sig", "--runs", root]) == 0
    assert "no finished run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "demo:badnets", "--json", "--csv"])

    out_file = tmp_path / "report.html"
    assert main(["report", "demo:badnets", "--runs", root, "--out", str(out_file), "--sample", "16", "--quiet",
                 "--run", run_id.rsplit("-", 1)[-1]]) == 0
    html = out_file.read_text()
    # nothing to fetch: no element loads a file or URL (plotly.js itself is inlined)
    assert not re.findall(r'<(?:script|img|link|iframe|source)\b[^>]*\b(?:src|href)="(?!data:)', html)
    assert "Plotly" in html and html.count('<img class="grid" alt=') == 2  # plotly.js inline, 2 Grad-CAM grids
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', html)) == 2
    assert run_id in html and "Pareto front" in html and "benign accuracy: accuracy on the clean test split" in html
    for section in ("Grad-CAM overlays", "Activation statistics", "Feature space", "Skip-connection ablation"):
        assert section in html
    assert html.count('class="js-plotly-plot"') + html.count("Plotly.newPlot") >= 5  # 2 run charts + 3 side-by-side
    assert main(["report", "demo:badnets", "--runs", root, "--out", str(out_file), "--run", "nope"]) == 2


def test_compare_page(real_store, monkeypatch, tmp_path):
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path / "empty"))
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params["suspect"] = "demo:badnets"
    at.session_state["sample_size"] = 50
    at.run()
    at.switch_page("views/compare.py").run()
    assert not at.exception, at.exception
    assert any("No finished run" in i.value for i in at.info)

    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(real_store.root))
    at.run()
    assert not at.exception, at.exception
    assert at.dataframe[0].value.shape[0] == 1
    published = at.dataframe[1].value  # the published numbers for these defenses, beside ours, tagged
    ft = published_for("finetune", "badnets")[0]
    row = published[published["attack"] == "badnets"].iloc[0]
    assert row["defense"] == "finetune" and row["tag"] == "README" and row["BA"] == pytest.approx(ft.ba)
    assert len(at.get("plotly_chart")) == 2  # BA vs. ASR, bars per metric
    labels = [m.label for m in at.metric]
    assert labels.count("ASR") == 2 and "Trigger-attention share, triggered inputs" in labels
    assert at.selectbox(key="cmp_right").value == runs_table(real_store, "demo:badnets").run_dir[0]
    assert [d.label for d in at.get("download_button")] == ["Table (CSV)", "Table (JSON)", "Charts (PNG, zip)",
                                                            "HTML report"]
    at.segmented_control(key="cmp_view").set_value("activations").run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 3
    at.multiselect(key="cmp_defenses").set_value([]).run()
    assert not at.exception and any("No run passes" in w.value for w in at.warning)
    assert math.isfinite(float(at.metric[0].value.rstrip("%")))
