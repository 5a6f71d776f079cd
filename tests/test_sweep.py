"""Sweeps on a real local Ray (2 CPUs): a tiny grid lands, resumes, survives a killed worker and a failing cell.

Ray starts once for the module (10-20 s); every cell uses small budgets (finetune 1 epoch, linf_prune a small
share, a pool of 50 images).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from defenses.base import ParamError
from runs.compare import BACKDOORBENCH_COLUMNS, backdoorbench_csv, group_runs, runs_table, table_json
from runs.store import RunStore
from runs.sweep import CRASH_ENV, SweepSpec, get_sweep, list_sweeps, run_sweep, sweep_cells

SUSPECT = "demo:badnets"
SETS = {"finetune.steps": 1, "linf_prune.max_ratio": 0.1}


# --- without Ray --------------------------------------------------------------------------------------------


def test_spec_expands_the_grid_with_distinct_keys(tmp_path):
    spec = SweepSpec.build("finetune,linf_prune", [SUSPECT], "quick,paper", 3, sets=SETS, pool_size=50)
    cells = spec.cells({SUSPECT: "fp"})
    assert spec.size() == len(cells) == 12
    assert len({c.key for c in cells}) == 12
    assert {c.seed for c in cells} == {0, 1, 2}
    assert all(c.overrides == {"steps": 1} for c in cells if c.defense == "finetune")
    assert spec.cells({SUSPECT: "other"})[0].key != cells[0].key  # another suspect, other keys
    assert spec.id == SweepSpec.build(["finetune", "linf_prune"], SUSPECT, ["quick", "paper"], [0, 1, 2],
                                      sets=SETS, pool_size=50).id
    grid = tmp_path / "grid.toml"
    grid.write_text('defenses = ["finetune", "linf_prune"]\nsuspects = ["demo:badnets"]\npresets = ["quick", "paper"]\n'
                    'seeds = 3\npool_size = 50\n[set.finetune]\nsteps = 1\n[set.linf_prune]\nmax_ratio = 0.1\n')
    assert SweepSpec.from_toml(grid).id == spec.id
    with pytest.raises(ParamError):
        SweepSpec.build("finetune", SUSPECT, sets={"steps": 1})  # --set in a sweep names its defense
    with pytest.raises(ParamError):
        SweepSpec.build("finetune", SUSPECT, sets={"anp.eps": 0.1})  # a defense not in the sweep
    with pytest.raises(ValueError):
        SweepSpec.build("no_such_defense", SUSPECT)


def test_group_runs_mean_and_sd():
    rng = np.random.default_rng(0)
    rows = []
    for d, n in (("a", 3), ("b", 1)):
        for s in range(n):
            rows.append({"run_id": f"{d}{s}", "defense": d, "preset": "quick", "overrides": "", "seed": s,
                         "ba": rng.random(), "asr": rng.random(), "ra": rng.random(), "der": rng.random(),
                         "seconds": rng.random()})
    table = pd.DataFrame(rows)
    g = group_runs(table).set_index("defense")
    a = table[table.defense == "a"]
    assert g.loc["a", "n_seeds"] == 3 and g.loc["a", "seeds"] == [0, 1, 2]
    assert g.loc["a", "ba_mean"] == pytest.approx(a.ba.mean())
    assert g.loc["a", "asr_sd"] == pytest.approx(np.std(a.asr.to_numpy(), ddof=1))
    assert g.loc["b", "n_seeds"] == 1 and math.isnan(g.loc["b", "ba_sd"])
    csv = backdoorbench_csv(group_runs(table), {"arch": "resnet18", "trigger": {"name": "badnets"},
                                                "data": {"name": "cifar10"}, "poison": {"rate": 0.1}})
    out = pd.read_csv(pd.io.common.StringIO(csv))
    assert list(out.columns) == BACKDOORBENCH_COLUMNS
    assert out.loc[0, "clean_acc"] == pytest.approx(round(100 * a.ba.mean(), 2))
    assert out.loc[0, "attack"] == "badnets" and out.loc[0, "pratio"] == 0.1
    from runs.report import _groups_html

    html = _groups_html(table)  # the HTML report's grouped table
    assert f"{a.ba.mean():.3f} ± {np.std(a.ba.to_numpy(), ddof=1):.3f}" in html and html.count("<tr>") == 3
    assert _groups_html(table[table.defense == "b"]) == ""  # no setting with several seeds: no table


# --- on Ray ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from runs.sweep import _ray_init

    marker = tmp_path_factory.mktemp("crash") / "crash-once"
    os.environ[CRASH_ENV] = str(marker)  # workers inherit it: a task deletes the marker and dies, once
    _ray_init(None, 2)
    yield marker
    ray.shutdown()
    os.environ.pop(CRASH_ENV, None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return RunStore(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def tiny():
    return SweepSpec.build("finetune,linf_prune", SUSPECT, "quick", 2, sets=SETS, pool_size=50)


def test_grid_lands_and_survives_a_killed_worker(ray_local, store, tiny):
    ray_local.write_text("die")  # the first task to start kills its worker; Ray retries it
    result = run_sweep(tiny, store, max_retries=1)
    assert not ray_local.exists(), "no task was killed"
    assert result.failed == {} and result.skipped == [] and len(result.runs) == 4
    table = runs_table(store, SUSPECT)
    assert len(table) == 4
    for d in ("finetune", "linf_prune"):
        assert sorted(table[table.defense == d]["seed"]) == [0, 1]
    assert set(table["sweep"]) == {tiny.id}
    assert all(os.path.isfile(os.path.join(d, "model.safetensors")) for d in table["run_dir"])
    rec = get_sweep(store, tiny.id)
    assert rec.status == "finished" and rec.done == 4 and rec.progress == 1.0
    assert [s.id for s in list_sweeps(store, SUSPECT)] == [tiny.id]
    groups = group_runs(table)
    assert list(groups["n_seeds"]) == [2, 2]
    import json

    data = json.loads(table_json(table, SUSPECT))
    assert {"ba_mean", "ba_sd", "asr_mean", "asr_sd", "n_seeds"} <= set(data["groups"][0])


def test_same_sweep_again_runs_nothing(ray_local, store, tiny):
    before = {r.id for r in store.list()}
    result = run_sweep(tiny, store)
    assert len(result.skipped) == 4 and result.failed == {}
    assert {r.id for r in store.list()} == before
    assert get_sweep(store, tiny.id).skipped == 4


def test_same_seed_same_cell_same_numbers(ray_local, store):
    import suspects
    from defenses.runner import run_defense

    table = runs_table(store, SUSPECT)
    row = table[(table.defense == "finetune") & (table.seed == 0)].iloc[0]
    torch.set_num_threads(1)
    local = run_defense("finetune", suspects.load(SUSPECT), "quick", {"steps": 1}, pool_size=50, seed=0,
                        device="cpu")
    assert (local["ba"], local["asr"], local["ra"]) == (row["ba"], row["asr"], row["ra"])


def test_failing_cell_is_recorded_and_the_others_finish(ray_local, store):
    spec = SweepSpec.build("finetune,linf_prune", SUSPECT, "quick", [5],
                           sets={"finetune.steps": 0, "linf_prune.max_ratio": 0.1}, pool_size=50)
    result = run_sweep(spec, store)
    assert len(result.failed) == 1 and "steps" in next(iter(result.failed.values()))
    assert len(result.runs) == 1
    cells = {c["defense"]: c for c in sweep_cells(store, spec.id)}
    assert cells["finetune"]["status"] == "failed" and "steps" in cells["finetune"]["error"]
    assert cells["linf_prune"]["status"] == "finished" and store.get(cells["linf_prune"]["run_id"]).status == "finished"
    rec = get_sweep(store, spec.id)
    assert (rec.status, rec.done, rec.failed) == ("finished", 1, 1)


def test_cli_sweep_from_a_toml_file_and_compare_exports(ray_local, store, tiny, tmp_path, capsys):
    import json

    from backdoor_lens.cli import main

    grid = tmp_path / "grid.toml"
    grid.write_text('defenses = "finetune,linf_prune"\nsuspects = ["demo:badnets"]\nseeds = 2\npool_size = 50\n'
                    '[set.finetune]\nsteps = 1\n[set.linf_prune]\nmax_ratio = 0.1\n')
    root = str(store.root)
    assert main(["sweep", str(grid), "--runs", root, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"sweep {tiny.id}: 4 cell(s)" in captured.err
    assert "0 ran, 4 skipped" in captured.out and "±" in captured.out
    assert main(["compare", SUSPECT, "--runs", root, "--json"]) == 0
    groups = {g["defense"]: g for g in json.loads(capsys.readouterr().out)["groups"] if g["overrides"] != ""}
    assert groups["finetune"]["n_seeds"] == 2 and groups["finetune"]["ba_sd"] is not None
    assert main(["compare", SUSPECT, "--runs", root, "--csv", "--backdoorbench"]) == 0
    out = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out))
    assert list(out.columns) == BACKDOORBENCH_COLUMNS and set(out["attack"]) == {"badnets"}
    ft = out[(out.defense == "finetune") & (out.n_seeds == 2)].iloc[0]
    assert ft["clean_acc"] == pytest.approx(round(100 * groups["finetune"]["ba_mean"], 2))


def test_compare_page_shows_sweeps_and_queues_one_the_worker_runs(ray_local, store, tiny, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import runs.jobs
    from runs.sweep import run_queued_sweeps

    started = []
    monkeypatch.setattr(runs.jobs, "ensure_worker", lambda s, device=None: started.append(s.root))
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(store.root))
    at = AppTest.from_file(str(__import__("pathlib").Path(__file__).parent.parent / "dashboard" / "app.py"),
                           default_timeout=240)
    at.query_params["suspect"] = SUSPECT
    at.session_state["sample_size"] = 50
    at.run()
    at.switch_page("views/compare.py").run()
    assert not at.exception, at.exception
    assert any(s.value.startswith("Sweeps (") for s in at.subheader)
    assert any("mean ± sample sd" in m.value for m in at.markdown)  # the groups' statistics, defined
    at.multiselect(key="cmp_sw_defenses").set_value(["finetune", "linf_prune"])
    at.number_input(key="cmp_sw_seeds").set_value(2)
    at.number_input(key="cmp_sw_pool").set_value(50)
    at.text_area(key="cmp_sw_sets").input("finetune.steps=1\nlinf_prune.max_ratio=0.1")
    next(b for b in at.button if b.label == "Start the sweep").click().run()
    assert not at.exception, at.exception
    assert any(tiny.id in s.value for s in at.success) and started == [store.root]
    assert get_sweep(store, tiny.id).status == "queued"
    assert run_queued_sweeps(store) == 1  # what the background worker does
    rec = get_sweep(store, tiny.id)
    assert rec.status == "finished" and rec.skipped == 4


def test_defend_with_seeds_reports_the_spread(tmp_path, capsys):
    import json

    from backdoor_lens.cli import main

    assert main(["defend", "linf_prune", SUSPECT, "--set", "max_ratio=0.1", "--pool-size", "50", "--seeds", "2",
                 "--runs", str(tmp_path), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["runs"]) == 2 and len(out["groups"]) == 1
    g = out["groups"][0]
    assert g["n_seeds"] == 2 and g["seeds"] == [0, 1] and g["ba_sd"] is not None
    table = runs_table(RunStore(tmp_path), SUSPECT)
    assert g["ba_mean"] == pytest.approx(table["ba"].mean())


def test_cancel_stops_the_remaining_tasks_and_leaves_no_half_written_run(ray_local, store):
    spec = SweepSpec.build("linf_prune", SUSPECT, "quick", [7, 8, 9], sets={"linf_prune.max_ratio": 0.1},
                           pool_size=50)
    before = len(store.list(status="finished"))
    with pytest.raises(KeyboardInterrupt):  # what Ctrl-C (or Cancel on the page) does to the driver
        run_sweep(spec, store, should_stop=lambda: len(store.list(status="finished")) > before)
    rec = get_sweep(store, spec.id)
    assert rec.status == "cancelled" and rec.done >= 1 and rec.done < 3
    assert not list(store.root.glob(".*.partial")) and not list(store.root.glob(".*.artifacts"))
    assert all(r.status == "finished" for r in store.list())
    states = [c["status"] for c in sweep_cells(store, spec.id)]
    assert "pending" in states and states.count("finished") == rec.done


def test_local_sweep_holds_the_device_lock_and_waits_for_it(tmp_path, monkeypatch, capsys):
    """A sweep on this machine takes the store's device lock (as ``defend`` does) and waits while another run holds
    it; a sweep on a cluster (``--address``) does not touch it."""
    import threading
    import time

    import runs.sweep
    from backdoor_lens.cli import main
    from runs.jobs import device_lock

    store = RunStore(tmp_path / "runs")
    seen = {}

    def fake_run_sweep(spec, store_, address=None, **kw):
        with device_lock(store_, None, wait=False) as free:
            seen[address] = free
        seen.setdefault("at", time.monotonic())
        raise KeyboardInterrupt  # the CLI's cancel path: no result to print

    monkeypatch.setattr(runs.sweep, "run_sweep", fake_run_sweep)
    argv = ["sweep", "--defenses", "finetune", "--suspects", "demo:badnets", "--runs", str(store.root), "--quiet"]
    released = {}
    held = threading.Event()

    def hold() -> None:
        with device_lock(store, None, wait=True):
            held.set()
            time.sleep(1.0)
            released["at"] = time.monotonic()

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    assert main(argv) == 1  # cancelled by the fake
    t.join()
    assert seen[None] is False  # the lock was the sweep's while it ran
    assert seen["at"] >= released["at"]  # and it waited for the other holder first
    assert "waiting for it" in capsys.readouterr().err
    seen.clear()
    assert main([*argv, "--address", "ray://nowhere:10001"]) == 1
    assert seen["ray://nowhere:10001"] is True  # a cluster sweep leaves the local lock alone
