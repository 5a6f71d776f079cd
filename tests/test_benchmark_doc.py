"""``scripts/benchmark.py``: the grid runs into a run store (resumable), and the document is regenerated from that
store alone, with mean ± sd over seeds and the published numbers beside ours."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from runs.compare import runs_table
from runs.published import PUBLISHED, published_for
from runs.store import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def _script():
    from scripts import benchmark

    return benchmark


def test_grid_runs_once_and_the_document_comes_from_the_store(tmp_path):
    bench = _script()
    store_dir, doc = tmp_path / "bench", tmp_path / "bench.md"
    argv = ["--runs", str(store_dir), "--defenses", "finetune", "--suspects", "badnets", "--presets", "quick",
            "--seeds", "2", "--pool-size", "50", "--set", "steps=1"]
    assert bench.main(["run", *argv]) == 0
    table = runs_table(RunStore(store_dir), "demo:badnets")
    assert sorted(table["seed"]) == [0, 1] and set(table["overrides"]) == {"steps=1"}
    assert bench.main(["run", *argv]) == 0  # resumable: nothing new to run
    assert len(runs_table(RunStore(store_dir), "demo:badnets")) == 2

    assert bench.main(["write", "--runs", str(store_dir), "--out", str(doc)]) == 0
    text = doc.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ") and "quick (steps=1)" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2"  # runs (test suspects x seeds)
    mean, sd = table["ba"].mean(), table["ba"].std()
    assert cells[3] == f"{mean:.3f} ± {sd:.3f}"  # BA as mean ± sample sd over the two stored runs
    lo, hi = table["ba"].min(), table["ba"].max()
    assert cells[4] == (f"{table['ba'].median():.3f} [{lo:.3f}, {hi:.3f}]" if lo != hi else f"{lo:.3f}")
    drop = (table["ba_before"] - table["ba"]).mean()
    assert cells[5].startswith(f"{drop:.3f}")
    k = int(((table["asr"] <= 0.05) & (table["ba_before"] - table["ba"] <= 0.03)).sum())
    assert cells[8].startswith(f"{k}/2")  # successes: ASR <= 0.05 at a BA drop <= 0.03
    ft = published_for("finetune", "badnets")[0]
    assert f"{ft.ba:.3f} / {ft.asr:.3f} [README]" in cells[12]  # the published number, tagged, beside ours
    assert "## Goals" in text and "badnets" in text
    # every run names the machine it ran on and the weights it repaired; the document says which machines
    from suspects.device import machine_info
    from suspects.identity import ref_fingerprint

    csv = pd.read_csv(doc.with_name("bench-runs.csv"), dtype=str, keep_default_na=False)
    assert set(csv["fingerprint"]) == {ref_fingerprint("demo:badnets")}
    assert set(csv["machine"]) == {bench.machine_text(machine_info("cpu"))}
    assert f"Machines: {bench.machine_text(machine_info('cpu'))} (2 runs)" in text and "second machine" in text
    # the table starts with the clean suspect measured under the attack's trigger: its BA is the clean card's
    header = text.splitlines().index(next(x for x in text.splitlines() if x.startswith("| defense |")))
    reference = [c.strip() for c in text.splitlines()[header + 2].strip("|").split("|")]
    clean_card = bench.card_of(bench.test_suspects("clean")[0])
    assert reference[0] == "clean suspect (reference)" and reference[3] == f"{clean_card['metrics']['ba']:.3f}"
    assert 0.0 <= float(reference[6]) <= 0.2 and float(reference[9]) > 0.5  # a clean model ignores BadNets' patch
    # the document regenerates from the CSV (and its -meta.json) alone, byte for byte
    store_dir.rename(tmp_path / "moved")
    assert bench.main(["write", "--runs", str(store_dir), "--out", str(doc), "--no-measure"]) == 0
    assert doc.read_text() == text

    runs = pd.read_csv(doc.with_name("bench-runs.csv"))
    assert len(runs) == 2 and set(runs["seed"]) == {0, 1}
    assert runs["ba"].round(4).tolist() == table.sort_values("seed")["ba"].round(4).tolist()
    assert "PreAct-ResNet-18 width" in text and "50-image clean pool (35 to train on, 15 held out)" in text


def test_run_takes_one_zoo_suspect_by_name(tmp_path):
    """``--suspects zoo:NAME`` runs the grid on that one test suspect (not every built suspect of its attack)."""
    bench = _script()
    argv = ["run", "--runs", str(tmp_path / "s"), "--defenses", "finetune", "--suspects", "zoo:badnets-s0",
            "--presets", "quick", "--seeds", "1", "--pool-size", "50", "--set", "steps=1",
            "--out", str(tmp_path / "b.md")]
    assert bench.main(argv) == 0
    store = RunStore(tmp_path / "s")
    assert len(runs_table(store, "zoo:badnets-s0")) == 1
    assert {r.suspect for r in store.list()} == {"zoo:badnets-s0"}


def test_a_new_store_adds_to_the_published_runs(tmp_path):
    """The runs CSV accumulates: ``run`` skips a run the CSV already holds (same suspect, preset version, seed, pool)
    and ``write`` from a store that holds only new runs keeps the CSV's others; a run made again replaces its row."""
    bench = _script()
    doc = tmp_path / "bench.md"
    argv = ["--defenses", "finetune", "--suspects", "badnets", "--presets", "quick", "--pool-size", "50",
            "--set", "steps=1", "--out", str(doc)]
    assert bench.main(["run", "--runs", str(tmp_path / "a"), "--seeds", "1", *argv]) == 0
    assert bench.main(["write", "--runs", str(tmp_path / "a"), *argv, "--no-measure"]) == 0
    first = pd.read_csv(doc.with_name("bench-runs.csv"))
    assert first["seed"].tolist() == [0]

    assert bench.main(["run", "--runs", str(tmp_path / "b"), "--seeds", "2", *argv]) == 0
    assert runs_table(RunStore(tmp_path / "b"), "demo:badnets")["seed"].tolist() == [1]  # seed 0 is in the CSV
    assert bench.main(["write", "--runs", str(tmp_path / "b"), *argv, "--no-measure"]) == 0
    both = pd.read_csv(doc.with_name("bench-runs.csv"))
    assert sorted(both["seed"]) == [0, 1] and set(first["run_id"]) < set(both["run_id"])
    row = next(line for line in doc.read_text().splitlines() if line.startswith("| ") and "quick (steps=1)" in line)
    assert [c.strip() for c in row.strip("|").split("|")][2] == "2"

    rows = bench.csv_rows(doc.with_name("bench-runs.csv"))
    again = rows[rows["seed"] == 0].assign(run_id="made-again", ba=0.5)
    merged = bench.merge_with_csv(again, rows)
    assert len(merged) == 2 and merged[merged["seed"] == 0]["ba"].tolist() == [0.5]
    renamed = again.assign(suspect="zoo:badnets-s0")  # the bundle's suspect under its zoo name: the same run
    assert len(bench.merge_with_csv(renamed, rows)) == 2
    assert (0 in {c[3] for c in bench._csv_cells_done(bench.csv_rows(doc.with_name("bench-runs.csv")), "zoo:badnets-s0")})


def test_runs_of_zoo_suspects_not_built_here_count_by_their_recorded_fingerprint(tmp_path):
    """On a fresh clone the zoo's s1 / s2 weights are not on disk (tests run with an empty zoo folder): their CSV rows
    still count when they name the fingerprint the manifest records, and not when they name other weights."""
    import shutil

    from suspects.zoo import default_zoo

    bench = _script()
    for name in ("defense-benchmarks-runs.csv", "defense-benchmarks-meta.json"):
        shutil.copy(ROOT / "docs" / name, tmp_path / name)
    csv = tmp_path / "defense-benchmarks-runs.csv"
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False)
    fst = rows[(rows["attack"] == "badnets") & (rows["defense"] == "fst") & (rows["preset"] == "quick")]
    before = len(bench.csv_rows(csv).query("attack == 'badnets' and defense == 'fst' and preset == 'quick' and "
                                           "current_weights and current_preset"))
    assert before >= 3
    recorded = default_zoo().entry("badnets-s1").fingerprint
    assert recorded and not default_zoo().present(default_zoo().entry("badnets-s1"))
    zoo_row = fst.iloc[[0]].assign(suspect="zoo:badnets-s1", fingerprint=recorded, run_id="zoo-s1-run", ba="0.5")
    other = fst.iloc[[0]].assign(suspect="zoo:badnets-s2", fingerprint="0" * 32, run_id="zoo-s2-run")
    pd.concat([rows, zoo_row, other]).to_csv(csv, index=False)
    table = bench.csv_rows(csv)
    assert table.set_index("run_id").loc["zoo-s1-run", "current_weights"]
    assert not table.set_index("run_id").loc["zoo-s2-run", "current_weights"]
    out = tmp_path / "defense-benchmarks.md"
    assert bench.main(["write", "--from-csv", "--out", str(out), "--no-measure"]) == 0
    section = out.read_text().split("## badnets", 1)[1].split("\n## ", 1)[0]
    row = next(x for x in section.splitlines() if x.startswith("| ") and "Feature Shift" in x)
    assert [c.strip() for c in row.strip("|").split("|")][2] == str(before + 1)  # + the new s1 run; s2's left out


def test_runs_on_earlier_weights_are_left_out(tmp_path, monkeypatch, capsys):
    """After the demo bundle is retrained, runs on the old weights no longer count as the suspect's numbers."""
    bench = _script()
    store_dir = tmp_path / "bench"
    assert bench.main(["run", "--runs", str(store_dir), "--defenses", "finetune", "--suspects", "badnets",
                       "--presets", "quick", "--seeds", "1", "--pool-size", "50", "--set", "steps=1"]) == 0
    card = bench.current_card("badnets")
    retrained = {**card, "metrics": {**card["metrics"], "ba": card["metrics"]["ba"] - 0.01}}
    monkeypatch.setattr(bench, "current_card", lambda attack: retrained)
    assert bench.main(["write", "--runs", str(store_dir), "--out", str(tmp_path / "x.md")]) == 2
    assert "(1 on earlier weights)" in capsys.readouterr().err
    # with a capacity study in the store the document is still written, and says that no run counts yet
    import json

    (store_dir / "capacity").mkdir()
    row = {"width": 16, "attack": "badnets", "defense": "anp", "preset": "quick", "seed": 0, "pool_size": 1000,
           "dev_ba_before": 0.9, "dev_asr_before": 1.0, "dev_ba": 0.88, "dev_asr": 0.1, "seconds": 10.0}
    (store_dir / "capacity" / "results.jsonl").write_text(json.dumps(row) + "\n")
    assert bench.main(["write", "--runs", str(store_dir), "--out", str(tmp_path / "x.md")]) == 0
    text = (tmp_path / "x.md").read_text()
    assert "No benchmark runs on the current demo suspects yet" in text and "1 runs were made on earlier" in text
    assert "## Capacity" in text and "0.020 / 0.100, 10 s (n=1)" in text


def test_runs_with_an_earlier_preset_are_left_out_and_redone(tmp_path, monkeypatch, capsys):
    """A preset re-chosen on the development split makes the cells run with its earlier version another setting:
    the document leaves them out (and says how many), and ``run`` fills the cell again with today's preset."""
    from defenses.registry import get_defense

    bench = _script()
    store_dir = tmp_path / "bench"
    argv = ["--runs", str(store_dir), "--defenses", "finetune", "--suspects", "badnets", "--presets", "quick",
            "--seeds", "1", "--pool-size", "50", "--set", "steps=1"]
    assert bench.main(["run", *argv]) == 0
    quick = get_defense("finetune").presets["quick"]
    monkeypatch.setitem(get_defense("finetune").presets, "quick", {**quick, "lr": quick["lr"] / 2})
    assert bench.main(["write", "--runs", str(store_dir), "--out", str(tmp_path / "x.md")]) == 2
    assert "1 with an earlier version of a preset" in capsys.readouterr().err
    assert bench.main(["run", *argv]) == 0  # the cell is run again with today's preset
    table = runs_table(RunStore(store_dir), "demo:badnets")
    assert len(table) == 2
    assert bench.main(["write", "--runs", str(store_dir), "--out", str(tmp_path / "x.md"), "--no-measure"]) == 0
    text = (tmp_path / "x.md").read_text()
    assert "1 runs made with an earlier version of a preset" in text
    assert "Redone with today's preset: finetune `quick (steps=1)` (badnets)." in text  # which cells were redone
    assert "Stale, not yet redone" not in text
    row = next(line for line in text.splitlines() if line.startswith("| ") and "quick (steps=1)" in line)
    assert [c.strip() for c in row.strip("|").split("|")][2] == "1"  # only the new run counts
    assert pd.read_csv(tmp_path / "x-runs.csv")["preset_version"].tolist() == [
        bench.preset_version("finetune", "quick", "steps=1")]


def test_the_document_regenerates_from_the_committed_csv(tmp_path):
    """docs/defense-benchmarks.md is what `write` makes from docs/defense-benchmarks-runs.csv and its -meta.json
    (the run store is not in the repository): a document edited by hand, or one left behind by a change of the
    code that renders it, fails here; `python scripts/benchmark.py write` regenerates it."""
    import shutil

    bench = _script()
    docs = ROOT / "docs"
    for name in ("defense-benchmarks-runs.csv", "defense-benchmarks-meta.json"):
        shutil.copy(docs / name, tmp_path / name)
    out = tmp_path / "defense-benchmarks.md"
    assert bench.main(["write", "--runs", str(tmp_path / "no-store"), "--out", str(out), "--no-measure"]) == 0
    assert out.read_text() == (docs / "defense-benchmarks.md").read_text(), (
        "docs/defense-benchmarks.md is not what its CSV gives today: run `python scripts/benchmark.py write`")


def test_a_preset_changed_after_its_cells_ran_makes_them_stale(tmp_path, monkeypatch):
    """The runs CSV keeps each run's preset version: re-choosing a preset makes its cells stale in the document
    regenerated from the CSV (left out of the tables, listed as not yet redone) without the run store."""
    import shutil

    from defenses.registry import get_defense

    bench = _script()
    for name in ("defense-benchmarks-runs.csv", "defense-benchmarks-meta.json"):
        shutil.copy(ROOT / "docs" / name, tmp_path / name)
    quick = get_defense("fst").presets["quick"]
    before = bench.preset_version("fst", "quick")
    monkeypatch.setitem(get_defense("fst").presets, "quick", {**quick, "steps": int(quick.get("steps", 70)) + 1})
    assert bench.preset_version("fst", "quick") != before
    out = tmp_path / "defense-benchmarks.md"
    assert bench.main(["write", "--from-csv", "--out", str(out), "--no-measure"]) == 0
    text = out.read_text()
    stale = text.split("**Stale, not yet redone**", 1)[1].split("\n", 1)[0]
    rows = bench.csv_rows(tmp_path / "defense-benchmarks-runs.csv")
    ran = sorted(set(rows[(rows["defense"] == "fst") & (rows["preset"] == "quick") & (rows["overrides"] == "")]["attack"]))
    assert {"badnets", "blended", "sig", "wanet"} <= set(ran)
    assert f"fst `quick` ({', '.join(ran)})" in stale  # every attack whose FST cell ran, no more
    assert not any(line.startswith("| ") and "Feature Shift Tuning (FST)" in line for line in text.splitlines())


def test_write_refuses_an_empty_store(tmp_path, capsys):
    assert _script().main(["write", "--runs", str(tmp_path / "none"), "--out", str(tmp_path / "x.md")]) == 2
    assert "no finished benchmark runs" in capsys.readouterr().err


def test_published_numbers_are_tagged_fractions():
    assert PUBLISHED
    for p in PUBLISHED:
        assert 0.0 <= p.ba <= 1.0 and 0.0 <= p.asr <= 1.0
        assert p.tag in {"README", "3rd", "figure"} and p.source


def test_every_attack_section_shows_its_published_no_defense_numbers_or_why_none():
    """Beside our suspects' before-metrics each attack's section gives the attack's published BA / ASR before any
    defense (tagged, another setting) or the reason none is recorded; a defense published only on other attacks
    says which."""
    from runs.published import NO_DEFENSE, NO_DEFENSE_MISSING, no_defense_text, none_recorded_text

    bench = _script()
    for p in NO_DEFENSE:
        assert 0.0 <= p.ba <= 1.0 and 0.0 <= p.asr <= 1.0 and p.tag == "README" and p.defense == "none"
    text = (ROOT / "docs" / "defense-benchmarks.md").read_text()
    for attack in bench.ATTACKS:
        entries = [p for p in NO_DEFENSE if p.attack == attack]
        assert entries or attack in NO_DEFENSE_MISSING, attack
        section = text.split(f"\n## {attack}\n", 1)[1].split("\n## ", 1)[0]
        assert f"Published, before any defense (another setting): {no_defense_text(attack)}." in section
    assert "0.907 / 0.983 [README]" in no_defense_text("inputaware")  # BackdoorBench, 10%: 90.67 / 98.26
    assert none_recorded_text("clp", "inputaware").startswith("none recorded for inputaware")
    assert "badnets" in none_recorded_text("clp", "inputaware")
    assert none_recorded_text("sau", "inputaware").startswith("none recorded: not on BackdoorBench")


def test_capacity_table_goes_into_the_document(tmp_path):
    """The capacity study's rows (development split) are summarised per width as mean ± sd in the document."""
    import json

    bench = _script()
    store_dir = tmp_path / "bench"
    assert bench.main(["run", "--runs", str(store_dir), "--defenses", "finetune", "--suspects", "badnets",
                       "--presets", "quick", "--seeds", "1", "--pool-size", "50", "--set", "steps=1"]) == 0
    rows = [{"width": w, "attack": "badnets", "defense": "anp", "preset": "quick", "seed": s, "pool_size": 1000,
             "dev_ba_before": 0.9, "dev_asr_before": 1.0, "dev_ba": 0.9 - d, "dev_asr": a, "seconds": 10.0 + s}
            for w, s, d, a in ((8, 0, 0.02, 0.1), (8, 1, 0.04, 0.3), (16, 0, 0.01, 0.0))]
    rows.append({"width": 8, "attack": "badnets", "defense": "shortcut", "preset": "quick", "seed": 0,
                 "pool_size": 1000, "dev_ba_before": 0.9, "dev_asr_before": 1.0, "seconds": 1.0,
                 "error": "no block scores above 0.05: name one"})
    (store_dir / "capacity").mkdir()
    (store_dir / "capacity" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = tmp_path / "b.md"
    assert bench.main(["write", "--runs", str(store_dir), "--out", str(doc), "--no-measure"]) == 0
    line = next(x for x in doc.read_text().splitlines() if x.startswith("| badnets | anp | quick |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "0.030 ± 0.014 / 0.200 ± 0.141, 10 s (n=2)"  # width 8: drop / ASR over seeds 0 and 1
    assert cells[4] == "0.010 / 0.000, 10 s (n=1)"  # width 16: one seed, no sd
    refused = next(x for x in doc.read_text().splitlines() if x.startswith("| badnets | shortcut | quick |"))
    assert "refused or failed (1x): no block scores above 0.05" in refused and "not run" in refused


def _groups(rows):
    cols = ["defense", "preset", "overrides", "n_seeds", "ba_mean", "ba_sd", "asr_mean", "asr_sd", "drop_mean",
            "seconds_mean"]
    return pd.DataFrame([dict(zip(cols, r, strict=True)) for r in rows])


def test_a_row_that_gave_up_at_every_seed_is_off_the_front():
    """l_inf pruning's unchanged model (BA before, ASR 1.0) would top the front; a row where it gave up at some
    seeds only still counts (its mean is a real trade-off)."""
    bench = _script()
    groups = _groups([("linf_prune", "quick", "", 3, 0.9, 0.0, 1.0, 0.0, 0.0, 10.0),
                      ("finetune", "quick", "", 3, 0.85, 0.01, 0.06, 0.01, 0.05, 10.0)])
    assert bench._front(groups) == {("linf_prune", "quick"), ("finetune", "quick")}  # without n_failed
    assert bench._front(groups.assign(n_failed=[3, 0])) == {("finetune", "quick")}
    assert bench._front(groups.assign(n_failed=[1, 0])) == {("linf_prune", "quick"), ("finetune", "quick")}


def test_goal_lines_check_the_retraining_and_paper_goals():
    """DBD / CBD's issue-13 goals (10 minutes, BA sd <= 0.03, DBD BadNets ASR <= 0.10 at BA >= 0.82), ANP's paper
    goal and the grid coverage are read off the grouped runs, and a goal without runs says so instead of passing."""
    bench = _script()
    before = {"ba": 0.9, "asr": 1.0, "ra": 0.0}
    good = {"badnets": (before, _groups([
        ("dbd", "quick", "", 3, 0.85, 0.01, 0.05, 0.02, 0.05, 500.0),
        ("anp", "paper", "", 3, 0.85, 0.01, 0.03, 0.01, 0.05, 900.0),
        ("finetune", "quick", "", 3, 0.88, 0.01, 0.04, 0.01, 0.02, 10.0)]))}
    text = "\n".join(bench.goal_lines(good))
    assert "DBD `quick` <= 10 minutes with a BA sd over 3 seeds <= 0.03: **met** on badnets" in text
    assert "DBD `quick` on BadNets at mean ASR <= 0.10 with mean BA >= 0.82: **met**" in text
    assert "CBD `quick` <= 10 minutes with a BA sd over 3 seeds <= 0.03: **not run yet**" in text
    assert "ANP `paper` at ASR <= 0.05 with a BA drop <= 0.07: **met**" in text
    assert "1 of 10 cells run" in text and "anp/blended" in text.split("not yet:")[1]
    assert "badnets: a post-training `quick` preset with mean ASR <= 0.05 at a mean BA drop <= 0.03 on the Pareto " \
           "front: **met** by finetune" in text
    bad = {"badnets": (before, _groups([
        ("dbd", "quick", "", 3, 0.80, 0.05, 0.20, 0.02, 0.10, 700.0),
        ("anp", "paper", "", 3, 0.80, 0.01, 0.03, 0.01, 0.10, 900.0)]))}
    text = "\n".join(bench.goal_lines(bad))
    assert "DBD `quick` <= 10 minutes with a BA sd over 3 seeds <= 0.03: **not met** on badnets (over time: badnets " \
           "700 s) (spread or seeds: badnets sd 0.050)" in text
    assert "DBD `quick` on BadNets at mean ASR <= 0.10 with mean BA >= 0.82: **not met**" in text
    assert "ANP `paper` at ASR <= 0.05 with a BA drop <= 0.07: **not met**" in text


def test_coverage_line_says_which_attacks_have_every_post_training_quick_cell():
    bench = _script()
    before = {"ba": 0.9, "asr": 1.0, "ra": 0.0}
    rows = [(d, "quick", "", 3, 0.88, 0.01, 0.04, 0.01, 0.02, 10.0) for d in bench.post_training()]
    results = {"badnets": (before, _groups(rows)), "blended": (before, _groups(rows[1:]))}
    line = bench.coverage_line(results)
    complete, missing = line.split("`quick` complete for every post-training defense on: ")[1].split("; `quick` not")
    assert complete == "badnets"  # blended lacks one post-training defense
    assert f"blended ({bench.post_training()[0]}, " in missing and "sig (every defense)" in missing
    assert "badnets (dbd, cbd, abl)" in missing  # registry order; the training-time defenses: not in the post-training grid


def test_the_clean_reference_rows_are_kept_where_this_machine_built_fewer_clean_suspects():
    """The committed reference rows (3 clean test suspects under each trigger) are reused on a machine that has built
    only some of them; a row measured on weights that are no build of a clean suspect, or not covering a clean
    suspect built here, is measured again."""
    import json

    bench = _script()
    meta = json.loads((ROOT / "docs" / "defense-benchmarks-meta.json").read_text())
    prev = meta["references"]["badnets"]
    assert prev["clean"] == ["zoo:clean-s0", "zoo:clean-s1", "zoo:clean-s2"]
    assert bench._measured_on_builds_of(prev, ["zoo:clean-s0"])
    assert bench._measured_on_builds_of(prev, list(prev["clean"]))
    assert not bench._measured_on_builds_of({**prev, "clean_fingerprints": ["0" * 32, *prev["clean_fingerprints"][1:]]},
                                            ["zoo:clean-s0"])
    assert not bench._measured_on_builds_of({**prev, "clean": prev["clean"][1:],
                                             "clean_fingerprints": prev["clean_fingerprints"][1:]}, ["zoo:clean-s0"])
    assert not bench._measured_on_builds_of({}, ["zoo:clean-s0"])


def test_the_dagger_names_which_presets_were_not_chosen_on_development_suspects():
    from defenses import list_defenses

    bench = _script()
    every = set(list_defenses())
    assert bench.dagger_text(every) == "every `quick` preset here is that choice"
    text = bench.dagger_text(every - {"dbd", "cbd", "finetune"})
    assert "DBD, CBD: training-time defenses" in text and "zoo:badnets-s0" in text
    assert "finetune: set in earlier rounds" in text
    assert "finetune" not in bench.dagger_text(every - {"dbd"}) and "DBD" in bench.dagger_text(every - {"dbd"})


def test_a_cell_is_the_zoo_attack_of_its_suspect_not_its_trigger(tmp_path):
    """BadNets at 1% and all-to-all BadNets use BadNets' trigger (their cards' ``trigger.name`` is ``badnets``) but
    are attacks of their own: their runs make their own cells, also when read from a CSV that filed them under
    badnets (as one written before this rule did)."""
    bench = _script()
    assert bench.attack_of("zoo:badnets_1pct-s1", "x") == "badnets_1pct"
    assert bench.attack_of("zoo:badnets_all2all-s0", "x") == "badnets_all2all"
    assert bench.attack_of("demo:badnets_1pct", "x") == "badnets_1pct"
    assert bench.attack_of("runs/some-model", "badnets") == "badnets"
    rows = pd.read_csv(ROOT / "docs" / "defense-benchmarks-runs.csv", dtype=str, keep_default_na=False)
    low = rows["suspect"].str.startswith(("zoo:badnets_1pct-", "zoo:badnets_all2all-"))
    assert low.any()
    rows.loc[low, "attack"] = "badnets"  # the old filing
    rows.to_csv(tmp_path / "old-runs.csv", index=False)
    read = bench.csv_rows(tmp_path / "old-runs.csv")
    assert set(read.loc[low.to_numpy(), "attack"]) <= {"badnets_1pct", "badnets_all2all"}
    assert set(read.loc[read["suspect"].str.startswith("zoo:badnets-"), "attack"]) == {"badnets"}
