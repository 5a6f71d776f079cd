"""One model, one name, one history (issue 27, items 1 and 2): a model's runs are found by its fingerprint (weights
and data) under any of its names, and a repaired model leads to its family (its parent's runs, the run that made it,
its own runs) on the Compare page, in ``backdoor-lens compare`` and in the report."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import suspects
from backdoor_lens.cli import main
from runs.compare import runs_table
from runs.identity import UNKNOWN, family, migrate, resolve_ref, runs_of, short_ref
from runs.jobs import create_run, execute
from runs.store import RunStore
from runs.uploads import save_upload
from suspects.identity import demo_name, find_clean_reference, fingerprint, ref_fingerprint
from suspects.store import DEMO_SUSPECTS

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")
FOLDER = DEMO_SUSPECTS / "badnets"
TINY = ["--set", "steps=2", "--set", "lr=0.05", "--pool-size", "100", "--measure", "subset:200", "--quiet",
        "--no-estimate"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(store: RunStore, ref: str, steps: int = 2) -> str:
    """A tiny fine-tuning run (2 steps on 100 pool images, 'after' on 200 test images), as the dashboard makes it."""
    rid = create_run(store, "finetune", ref, "quick", {"steps": steps, "lr": 0.05}, pool_size=100, pid=os.getpid(),
                     measure="subset:200")
    assert execute(store, rid) == "finished", store.get(rid).error
    return rid


@pytest.fixture(scope="module")
def family_store(tmp_path_factory):
    """One model named three ways, a run under each name (the CLI on the folder, the dashboard on ``demo:badnets``,
    an uploaded copy), and a run on the CLI run's repaired model."""
    root = tmp_path_factory.mktemp("identity-runs")
    store = RunStore(root)
    assert main(["defend", "finetune", os.path.relpath(FOLDER), "--runs", str(root), *TINY]) == 0
    cli_run = store.list(status="finished")[0].id
    dash_run = _run(store, "demo:badnets")
    upload, _ = save_upload((FOLDER / "model.safetensors").read_bytes(), "my-model.safetensors", "preact_resnet18",
                            "demo", root=root)
    upload_run = _run(store, str(upload), steps=3)
    child_run = _run(store, cli_run_dir := store.get(cli_run).run_dir, steps=1)
    return {"store": store, "root": root, "cli": cli_run, "dash": dash_run, "upload": upload, "upload_run": upload_run,
            "child": child_run, "cli_dir": cli_run_dir}


def test_one_history_under_three_names(family_store):
    """``demo:badnets``, its folder and an uploaded copy of its weights share one fingerprint and one run list."""
    fs, store = family_store, family_store["store"]
    names = ["demo:badnets", str(FOLDER), os.path.relpath(FOLDER), str(fs["upload"])]
    prints = {ref_fingerprint(n) for n in names}
    assert len(prints) == 1 and None not in prints
    expected = {fs["cli"], fs["dash"], fs["upload_run"]}
    for name in names:
        assert set(runs_table(store, name).run_id) == expected, name
    # the repaired model is another model: its history is its own run only
    assert set(runs_table(store, fs["cli_dir"]).run_id) == {fs["child"]}
    # the runs record the one fingerprint, whatever name they were given
    assert {store.get(r).suspect_key for r in expected} == prints


def test_cli_compare_under_any_name(family_store, capsys):
    fs = family_store
    for name in ("demo:badnets", str(FOLDER), str(fs["upload"])):
        assert main(["compare", name, "--runs", str(fs["root"]), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert {r["run_id"] for r in data["runs"]} == {fs["cli"], fs["dash"], fs["upload_run"]}, name
        assert data["suspect"] == "demo:badnets"  # the short name, never a server path


def test_short_names_and_run_ids(family_store):
    fs, store = family_store, family_store["store"]
    assert demo_name(str(FOLDER)) == "demo:badnets" and demo_name(str(fs["upload"])) == "demo:badnets"
    assert short_ref(fs["cli_dir"], store) == fs["cli"]
    assert resolve_ref(fs["cli"], store) == fs["cli_dir"]
    assert resolve_ref(f"uploads/{Path(fs['upload']).name}", store) == str(fs["upload"])
    repaired = suspects.load(fs["cli_dir"])
    prov = repaired.card["provenance"]
    assert prov["run_id"] == fs["cli"] and prov["parent_fingerprint"] == ref_fingerprint("demo:badnets")


def test_stress_reference_by_fingerprint(family_store):
    """The folder, the demo name, an upload of the same weights and a model repaired from any of them find the same
    clean reference."""
    fs = family_store
    for ref in ("demo:badnets", str(FOLDER), str(fs["upload"]), fs["cli_dir"], store_dir(fs, "upload_run")):
        assert find_clean_reference(suspects.load(ref), ref) == "demo:clean", ref


def store_dir(fs: dict, key: str) -> str:
    return fs["store"].get(fs[key]).run_dir


def test_stored_scans_resolve_by_fingerprint():
    """A Neural Cleanse scan stored for ``demo:badnets`` is the folder's stored scan too (same file)."""
    from analysis.reverse import ScanConfig
    from runs.scans import scan_file

    cfg = ScanConfig()
    assert scan_file("/r", suspects.load("demo:badnets"), cfg) == scan_file("/r", suspects.load(str(FOLDER)), cfg)


def test_family_of_a_repaired_model(family_store, capsys):
    fs, store = family_store, family_store["store"]
    repaired = suspects.load(fs["cli_dir"])
    fam = family(store, repaired, fs["cli_dir"])
    assert fam.made_by.id == fs["cli"] and fam.parent_ref == "demo:badnets"
    assert {r.id for r in fam.siblings} == {fs["cli"], fs["dash"], fs["upload_run"]}
    assert [r.id for r in fam.children] == [fs["child"]]
    # a model no run made has no family above it
    assert family(store, suspects.load("demo:badnets"), "demo:badnets").made_by is None

    assert main(["compare", fs["cli"], "--runs", str(fs["root"])]) == 0  # by run id
    out = capsys.readouterr()
    assert f"{fs['cli']} is the repaired model of run {fs['cli']}" in out.out
    assert "of its parent demo:badnets" in out.out
    marked = [line for line in out.out.splitlines() if line.lstrip().startswith("->")]
    assert [fs["cli"] in line for line in marked] == [True, False]  # its row, then the legend
    for rid in (fs["dash"], fs["upload_run"], fs["child"]):
        assert rid in out.out
    assert str(fs["root"]) + "/" not in out.out  # no absolute path of a run folder in a hint
    assert main(["compare", fs["cli"], "--runs", str(fs["root"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"]["made_by"] == fs["cli"] and data["family"]["parent"] == "demo:badnets"
    assert [r["run_id"] for r in data["runs"]] == [fs["child"]]
    # the same settings and seed on the same model give the same weights: one model, one history
    assert fingerprint(suspects.load(store_dir(fs, "dash"))) == fingerprint(repaired)
    assert runs_table(store, fs["dash"]).run_id.tolist() == [fs["child"]]
    # a repaired model without runs of its own: the hint names it by its run id
    assert main(["compare", fs["upload_run"], "--runs", str(fs["root"])]) == 0
    out = capsys.readouterr().out
    assert f"`backdoor-lens defend DEFENSE {fs['upload_run']}`" in out and fs["cli"] in out


def test_old_rows_are_migrated_or_matched_by_name(tmp_path):
    """A store written before fingerprints: columns are added, rows made on weights older than the run get the
    fingerprint, rows whose suspect no longer loads stay matched by their name."""
    db = tmp_path / "index.sqlite"
    with sqlite3.connect(db) as c:
        c.executescript("CREATE TABLE runs (id TEXT PRIMARY KEY, defense TEXT NOT NULL, suspect TEXT NOT NULL, "
                        "preset TEXT, params TEXT, pool_size INTEGER, seed INTEGER, device TEXT, status TEXT NOT NULL, "
                        "progress REAL DEFAULT 0, message TEXT DEFAULT '', created REAL, started REAL, finished REAL, "
                        "pid INTEGER, cancel INTEGER DEFAULT 0, run_dir TEXT, error TEXT, summary TEXT);")
        for rid, ref in (("old-demo", "demo:badnets"), ("old-gone", str(tmp_path / "deleted")),
                         ("old-future", "demo:badnets")):
            created = time.time() if rid != "old-future" else 1.0  # a run older than the bundle's weights
            c.execute("INSERT INTO runs (id, defense, suspect, preset, params, pool_size, seed, status, created) "
                      "VALUES (?, 'finetune', ?, 'quick', '{}', 100, 0, 'failed', ?)", (rid, ref, created))
    store = RunStore(tmp_path)
    assert migrate(store) == 3 and migrate(store) == 0
    key = ref_fingerprint("demo:badnets")
    assert store.get("old-demo").suspect_key == key
    assert store.get("old-future").suspect_key == UNKNOWN and store.get("old-gone").suspect_key == UNKNOWN
    ids = {r.id for r in runs_of(store, str(FOLDER), status=None)}
    assert ids == {"old-demo", "old-future"}  # the stale row still by its name (demo:NAME and its folder)
    assert {r.id for r in runs_of(store, str(tmp_path / "deleted"), status=None)} == {"old-gone"}


def test_compare_page_of_a_repaired_model(family_store, monkeypatch):
    """Open the repaired model: Compare shows the parent's runs with the run that made it highlighted, and its own
    runs; no hint carries a server path."""
    fs = family_store
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(fs["root"]))
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params["suspect"] = fs["cli_dir"]
    at.session_state["sample_size"] = 50
    at.run()
    at.switch_page("views/compare.py").run()
    assert not at.exception, at.exception
    assert any(f"repaired model of run {fs['cli']}" in i.value for i in at.info)
    tables = [d.value for d in at.dataframe if "run_id" in d.value.columns]
    parent, own = tables[0], tables[-1]  # the parent's runs first, this model's own runs last
    assert set(parent.run_id) == {fs["cli"], fs["dash"], fs["upload_run"]}
    assert parent.set_index("run_id")["made_this_model"].to_dict()[fs["cli"]]
    assert parent["made_this_model"].sum() == 1
    assert own.run_id.tolist() == [fs["child"]] and "made_this_model" not in own.columns
    assert at.selectbox(key="cmp_right").value == fs["cli_dir"]  # this model, beside its parent
    assert at.selectbox(key="cmp_left").value == "demo:badnets"
    texts = [e.value for e in (*at.info, *at.caption, *at.markdown)]
    assert not any(f"defend DEFENSE {fs['root']}" in t for t in texts)
    # the sidebar lists each run once, each with its own tag
    labels = at.sidebar.selectbox[0].options
    assert len(labels) == len(set(labels))


def test_report_of_a_repaired_model_shows_its_family(family_store):
    from runs.report import html_report

    fs = family_store
    html = html_report(fs["cli"], store=fs["store"], n=16, parts=("activations",))
    assert f"repaired model of run {fs['cli']}" in html and "Runs of its parent" in html
    assert html.count('class="made"') + html.count('class="pareto made"') == 1
    assert all(rid in html for rid in (fs["dash"], fs["upload_run"], fs["child"]))
    assert f"<dd>{fs['cli']}</dd>" in html  # the model's reference is its run id, not its folder
