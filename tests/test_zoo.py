"""The suspect zoo (issue 28): a tiny recipe builds a test and a development suspect, ``zoo --json`` lists them with
distinct fingerprints, a second build skips them, a stopped build leaves nothing that looks complete, and
``scripts/tune_on_dev.py`` refuses test suspects."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from backdoor_lens.cli import main
from suspects.zoo import MANIFEST, Zoo, ZooBusyError

ROOT = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="the full Fashion-MNIST is not on this machine")
pytestmark = [pytest.mark.usefixtures("one_thread"), needs_fmnist]

TINY = {"epochs": 1, "width": 4, "max_steps": 2}


def _tiny_manifest(path: Path) -> Path:
    """The repository's manifest with a tiny recipe: badnets only, test seeds 0 (the bundle's) and 1, dev seed 10,
    400 training and 200 test images."""
    m = json.loads(MANIFEST.read_text())
    m["recipe"].update(TINY)
    m["attacks"] = {"badnets": m["attacks"]["badnets"]}
    m["roles"]["test"].update(seeds=[0, 1], data={"name": "demo", "limit_train": 400, "limit_test": 200})
    m["roles"]["dev"].update(seeds=[10], data={"name": "fashion-mnist-dev", "limit_train": 400, "limit_test": 200})
    m["fingerprints"] = {"badnets-s0": m["fingerprints"]["badnets-s0"]}
    m.pop("rebuilds", None)  # the repository's rebuilds are of the full recipe
    path.write_text(json.dumps(m, indent=2))
    return path


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    base = tmp_path_factory.mktemp("zoo")
    manifest, root = _tiny_manifest(base / "zoo.json"), base / "built"
    rc = main(["zoo", "build", "--manifest", str(manifest), "--root", str(root), "--quiet", "--json"])
    assert rc == 0
    return manifest, root


@pytest.fixture
def tiny_env(tiny_zoo, monkeypatch):
    manifest, root = tiny_zoo
    monkeypatch.setenv("BACKDOOR_LENS_ZOO_MANIFEST", str(manifest))
    monkeypatch.setenv("BACKDOOR_LENS_ZOO", str(root))
    return tiny_zoo


def _tune_on_dev():
    from scripts import tune_on_dev

    return tune_on_dev


def test_build_lists_and_skips(tiny_zoo, capsys):
    manifest, root = tiny_zoo
    capsys.readouterr()
    assert main(["zoo", "--json", "--verify", "--manifest", str(manifest), "--root", str(root)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"badnets-s0", "badnets-s1", "badnets-dev-s10"}
    assert [(rows[n]["role"], rows[n]["seed"]) for n in ("badnets-s0", "badnets-s1", "badnets-dev-s10")] == \
        [("test", 0), ("test", 1), ("dev", 10)]
    assert all(r["present"] and r["attack"] == "badnets" for r in rows.values())
    fps = [r["fingerprint"] for r in rows.values()]
    assert all(fps) and len(set(fps)) == 3
    assert all(r["matches"] is True for r in rows.values())  # the weights on disk are the ones recorded
    assert rows["badnets-s0"]["path"] == str(ROOT / "assets" / "demo" / "suspects" / "badnets")
    # the build recorded the new fingerprints in the (temporary) manifest
    recorded = json.loads(manifest.read_text())["fingerprints"]
    assert recorded["badnets-s1"] == rows["badnets-s1"]["fingerprint"]
    card = json.loads((root / "badnets-dev-s10" / "suspect.json").read_text())
    assert card["zoo"]["role"] == "dev" and card["zoo"]["seed"] == 10 and card["seed"] == 10
    assert card["zoo"]["fingerprint"] == recorded["badnets-dev-s10"]
    assert "--seed 10" in card["zoo"]["command"] and "--keep-pool-out" in card["zoo"]["command"]
    assert card["data"] == {"name": "fashion-mnist-dev", "limit_train": 400, "limit_test": 200}
    assert card["zoo"]["machine"]["cpu_capability"]
    # a second build trains nothing
    assert main(["zoo", "build", "--manifest", str(manifest), "--root", str(root), "--quiet", "--json"]) == 0
    assert {r["action"] for r in json.loads(capsys.readouterr().out)} == {"skipped"}


def test_a_stopped_build_leaves_nothing_complete(tiny_zoo, tmp_path):
    manifest, _ = tiny_zoo
    zoo = Zoo(manifest, tmp_path)
    entry = zoo.entry("zoo:badnets-s1")

    def stop(fraction, message, metrics):
        if "ba" in metrics:  # the end of the first epoch: training is done, nothing saved yet
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        zoo.build(only=["badnets-s1"], progress=stop, record=False)
    assert not zoo.present(entry) and [p.name for p in tmp_path.iterdir()] == [".build.lock"]  # no partial folder
    assert [r.action for r in zoo.build(only=["badnets-s1"], dry_run=True)] == ["would build"]
    fcntl = pytest.importorskip("fcntl")
    with open(tmp_path / ".build.lock", "w") as fh:  # another build holds the folder
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ZooBusyError, match="another zoo build"):
            zoo.build(only=["badnets-s1"])


def test_zoo_references_load_and_the_picker_lists_them(tiny_env):
    import suspects
    from dashboard.common import zoo_suspects
    from suspects.identity import ref_fingerprint
    from suspects.zoo import dev_suspects, test_suspects

    assert test_suspects("badnets") == ["zoo:badnets-s0", "zoo:badnets-s1"]
    assert dev_suspects("badnets") == ["zoo:badnets-dev-s10"]
    assert zoo_suspects() == ["zoo:badnets-s1", "zoo:badnets-dev-s10"]  # seed 0 is listed as demo:badnets
    sus = suspects.load("zoo:badnets-dev-s10")
    assert len(sus.defense_pool) == 40 and len(sus.test) == 200
    assert ref_fingerprint("zoo:badnets-s0") == ref_fingerprint("demo:badnets")
    with pytest.raises(suspects.SuspectLoadError, match="no zoo suspect"):
        suspects.load("zoo:badnets-s7")


def test_the_committed_manifest_names_the_bundle_weights():
    from suspects.identity import ref_fingerprint
    from suspects.zoo import default_zoo

    zoo = default_zoo()
    assert {e.name for e in zoo.entries("test") if e.bundle} == {f"{a}-s0" for a in zoo.manifest["attacks"]}
    for e in zoo.entries():
        assert e.role in ("test", "dev") and (e.seed >= 10) == (e.role == "dev")
        if e.bundle:
            assert e.fingerprint == ref_fingerprint(e.bundle), e.name
    assert len(zoo.entries("dev", "sig")) >= 3 and len(zoo.entries("test", "clean")) == 3


def test_tune_on_dev_refuses_test_suspects(tiny_env, tmp_path, capsys):
    tune = _tune_on_dev()
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "assets" / "demo" / "suspects" / "sig", copy)
    for ref, why in (("zoo:badnets-s1", "role test"), ("demo:badnets", "demo bundle suspect"),
                     (str(copy), "weights of the test suspect")):
        assert tune.main(["finetune", ref, "--log", str(tmp_path / "t.jsonl")]) == 2
        err = capsys.readouterr().err
        assert "refused" in err and why in err, err
    assert tune.main(["finetune", "zoo:badnets-dev-s10", "--seed", "2"]) == 2
    assert "below 1000" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()
    assert tune.expand("badnets") == ["zoo:badnets-dev-s10"]
    assert tune.check_suspect("zoo:badnets-dev-s10").card["zoo"]["role"] == "dev"


def test_tune_on_dev_logs_a_trial_on_a_dev_suspect(tiny_env, tmp_path, capsys, monkeypatch):
    import torch

    tune = _tune_on_dev()
    log = tmp_path / "trials.jsonl"
    monkeypatch.setenv("BACKDOOR_LENS_DETERMINISTIC", "1")
    assert tune.main(["finetune", "badnets", "--set", "steps=1", "--log", str(log), "--note", "test"]) == 0
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert row["suspect"] == "zoo:badnets-dev-s10" and row["seed"] == 1000 and row["role"] == "dev"
    assert row["params"]["steps"] == 1 and row["measured_on"] == "the whole test split"
    # the run's report records the machine, with deterministic kernels on for the repair and off again after it
    assert row["machine"]["threads"] == torch.get_num_threads() and row["machine"]["deterministic"] is True
    assert row["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert not torch.are_deterministic_algorithms_enabled()
    assert 0 <= row["dev_ba"] <= 1 and row["fingerprint"]


def test_the_development_source_avoids_the_bundle():
    from suspects.data import DEMO_DATA, fashion_mnist_dev_indices, load_dataset, read_idx

    labels = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    bundle = np.load(DEMO_DATA)["train_source_index"]
    tr, te = fashion_mnist_dev_indices(labels, bundle)
    assert len(tr) == 10000 and len(te) == 2500 and not np.intersect1d(tr, te).size
    assert not np.intersect1d(tr, bundle).size and not np.intersect1d(te, bundle).size
    assert (np.bincount(labels[tr]) == 1000).all() and (np.bincount(labels[te]) == 250).all()
    pair = load_dataset({"name": "fashion-mnist-dev", "limit_test": 50})
    assert pair.spec == {"name": "fashion-mnist-dev", "limit_test": 50} and len(pair.test) == 50
    assert pair.classes == load_dataset("demo").classes


def test_a_rebuild_on_another_machine_is_recorded_and_its_first_builds_results_still_count(tiny_zoo, tmp_path,
                                                                                          monkeypatch, capsys):
    """A build whose weights differ from the manifest's fingerprint (another machine's numerics) keeps the manifest's
    fingerprint, is listed under ``rebuilds``, and scans and benchmark runs on either build count as the suspect's,
    while weights that are neither stay stale; a tuning trial on the rebuild is refused like one on the original."""
    import pandas as pd

    first = "f" * 32  # as if the first build had been made elsewhere
    m = json.loads(tiny_zoo[0].read_text())
    m["fingerprints"]["badnets-s1"] = first
    manifest, root = tmp_path / "zoo.json", tmp_path / "built"
    manifest.write_text(json.dumps(m))
    assert main(["zoo", "build", "--manifest", str(manifest), "--root", str(root), "--only", "badnets-s1",
                 "--quiet"]) == 0
    assert "lists these under `rebuilds`" in capsys.readouterr().out
    saved = json.loads(manifest.read_text())
    assert saved["fingerprints"]["badnets-s1"] == first  # never overwritten
    (rebuild,) = saved["rebuilds"]["badnets-s1"]
    here = rebuild["fingerprint"]
    assert here != first and rebuild["machine"]["cpu_capability"] and 0 <= rebuild["metrics"]["ba"] <= 1
    zoo = Zoo(manifest, root)
    entry = zoo.entry("badnets-s1")
    assert zoo.known_fingerprints(entry) == {first, here}
    assert zoo.test_fingerprints()[first] == zoo.test_fingerprints()[here] == "zoo:badnets-s1"
    zoo.record_rebuild("badnets-s1", here, {}, {})  # once per fingerprint
    assert len(json.loads(manifest.read_text())["rebuilds"]["badnets-s1"]) == 1
    monkeypatch.setenv("BACKDOOR_LENS_ZOO_MANIFEST", str(manifest))
    monkeypatch.setenv("BACKDOOR_LENS_ZOO", str(root))

    spec = importlib.util.spec_from_file_location("detection_doc_rebuild", ROOT / "scripts" / "detection_doc.py")
    det = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(det)
    for fp, state in ((first, "measured"), (here, "measured"), ("0" * 32, "stale")):
        cell = {"attack": "badnets", "ref": "zoo:badnets-s1", "fingerprint": fp, "config": det.scan_config()}
        assert det.cell_state({"cells": {"zoo:badnets-s1": cell}}, "zoo:badnets-s1") == state, fp

    spec = importlib.util.spec_from_file_location("benchmark_rebuild", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    card = json.loads((root / "badnets-s1" / "suspect.json").read_text())["metrics"]
    version = bench.preset_version("finetune", "quick", "")
    rows = pd.DataFrame([  # the first build's run (other before-metrics), the rebuild's, and one on unknown weights
        {"fingerprint": first, "ba_before": 0.5, "asr_before": 0.9, "ra_before": 0.1},
        {"fingerprint": here, "ba_before": card["ba"], "asr_before": card["asr"], "ra_before": card["ra"]},
        {"fingerprint": here, "ba_before": card["ba"] - 0.1, "asr_before": card["asr"], "ra_before": card["ra"]},
        {"fingerprint": "0" * 32, "ba_before": 0.5, "asr_before": 0.9, "ra_before": 0.1},
    ]).assign(attack="badnets", defense="finetune", preset="quick", overrides="", seed=0, ba=0.4, ba_drop=0.1,
              asr=0.5, ra=0.4, der=0.6, seconds=1.0, failed=False, device="cpu", clean_images=40, held_out=0,
              date="2026-12-06", run_id=["a", "b", "c", "d"], suspect="zoo:badnets-s1", preset_version=version,
              machine="m")
    csv = tmp_path / "runs.csv"
    rows.to_csv(csv, index=False)
    assert bench.csv_rows(csv)["current_weights"].tolist() == [True, True, False, False]
    before = bench.build_metrics(bench.csv_rows(csv).iloc[:2])  # one entry per build
    assert sorted(round(b["ba"], 4) for b in before) == sorted([0.5, round(card["ba"], 4)])

    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("choose_presets_rebuild", ROOT / "scripts" / "choose_presets.py")
    choose = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "choose_presets_rebuild", choose)  # its dataclass looks its module up
    spec.loader.exec_module(choose)
    why = choose.refusal({"suspect": str(tmp_path / "a-copy"), "fingerprint": here}, zoo.test_fingerprints())
    assert why and "weights of the test suspect zoo:badnets-s1" in why
