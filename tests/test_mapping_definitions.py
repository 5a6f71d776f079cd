"""Issue 30: the ASR / RA definitions follow the attack's label mapping (all-to-one: target-class test images left
out; all-to-all: class y succeeds at (y + 1) mod K, every test image counts) wherever they are stated, and the
upload form asks for the mapping, refusing one the attack does not support (SIG is clean-label: all-to-one only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import suspects
from suspects.metrics import DEFINITIONS, asr_rule, evaluate_subset, metric_definitions
from suspects.store import DEMO_SUSPECTS
from suspects.triggers import make_trigger

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
OLD = "target class excluded"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_definition_states_the_set_the_trigger_measures():
    labels = torch.arange(10).repeat(3)
    a2a = make_trigger("badnets", (3, 8, 8), 10, mapping="all-to-all")
    a2o = make_trigger("badnets", (3, 8, 8), 10, target=2)
    d = metric_definitions(a2a)
    assert a2a.test_mask(labels).all()  # every test image counts ...
    assert "every test image counts" in d["asr"] and "every test image" in d["ra"] and OLD not in d["asr"]
    assert torch.equal(a2a.target_labels(labels), (labels + 1) % 10)  # ... and succeeds at (y + 1) mod K
    assert "(y + 1) mod K with K = 10" in d["asr"]
    assert not a2o.test_mask(labels)[labels == 2].any()  # all-to-one: the target class is left out
    assert OLD in metric_definitions(a2o)["asr"] and "all-to-all" not in metric_definitions(a2o)["asr"]
    assert metric_definitions(a2a.spec(), num_classes=10) == d  # a spec dict reads the same
    assert asr_rule(None) in DEFINITIONS["asr"] and OLD in DEFINITIONS["asr"] and "all-to-all" in DEFINITIONS["asr"]


@pytest.fixture(scope="module")
def a2a_suspect(tmp_path_factory) -> str:
    """A tiny BadNets all-to-all suspect (width 4, two steps on the demo data) under the run store's uploads/,
    where the suspect picker finds it."""
    from backdoor_lens.cli import main

    root = tmp_path_factory.mktemp("a2a-runs")
    out = root / "uploads" / "badnets_a2a"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BACKDOOR_LENS_RUNS", str(root))
        assert main(["train", "--data", "demo", "--width", "4", "--epochs", "1", "--max-steps", "2", "--batch-size",
                     "32", "--seed", "0", "--quiet", "--out", str(out), "--attack", "badnets", "--mapping",
                     "all-to-all"]) == 0
        yield str(out)


def open_app(ref: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params["suspect"] = ref
    at.run()
    assert not at.exception, at.exception
    return at


def page_text(at) -> str:
    return " ".join(str(e.value) for e in [*at.caption, *at.markdown]) + " ".join(m.help or "" for m in at.metric)


def test_overview_states_the_all_to_all_definition(a2a_suspect):
    trig = suspects.load(a2a_suspect).trigger
    assert trig.mapping == "all-to-all"
    at = open_app(a2a_suspect)
    assert "badnets_a2a" in at.title[0].value
    text = page_text(at)
    assert metric_definitions(trig)["asr"] in text and metric_definitions(trig)["ra"] in text
    assert "(y + 1) mod K with K = 10; every test image counts" in text and OLD not in text


def test_overview_of_an_all_to_one_suspect_keeps_the_target_class_rule():
    at = open_app("demo:badnets")
    assert "badnets" in at.title[0].value
    text = page_text(at)
    assert "(all-to-one: test images of the target class excluded)" in text and "every test image counts" not in text


def test_evaluate_compare_and_report_state_the_mapping(a2a_suspect, capsys, tmp_path):
    from backdoor_lens.cli import main

    assert main(["evaluate", a2a_suspect, "--limit", "50"]) == 0
    out = capsys.readouterr().out
    assert "all-to-all: a triggered image of class y counts as a success" in out and OLD not in out
    from runs.compare import format_table, runs_table
    from runs.store import RunStore

    trig = suspects.load(a2a_suspect).trigger
    text = format_table(runs_table(RunStore(tmp_path / "runs"), a2a_suspect), trigger=trig)
    assert asr_rule(trig) in text and OLD not in text
    from runs.report import html_report

    report = html_report(a2a_suspect, store=RunStore(tmp_path / "runs"), n=16, parts=("activations",))
    assert asr_rule(trig) in report and OLD not in report  # the report's Metrics section


def _upload(at, name: str, raw: bytes, attack: str, mapping: str):
    at.file_uploader(key="upload_file").set_value((name, raw, "application/octet-stream")).run()
    at.selectbox(key="upload_attack").set_value(attack).run()
    at.radio(key="upload_mapping").set_value(mapping).run()
    assert not at.exception, at.exception
    at.button(key="upload_go").click().run()
    assert not at.exception, at.exception
    return at


def test_upload_form_stores_the_all_to_all_mapping_and_measures_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path / "runs"))
    raw = (DEMO_SUSPECTS / "badnets" / "model.safetensors").read_bytes()
    at = open_app("demo:badnets")
    _upload(at, "a2a.safetensors", raw, "badnets", "all-to-all")
    assert not at.sidebar.error, [e.value for e in at.sidebar.error]
    folders = list((tmp_path / "runs" / "uploads").iterdir())
    assert len(folders) == 1
    assert "a2a" in at.title[0].value  # the Overview of the upload
    s = suspects.load(folders[0])
    assert s.card["trigger"]["mapping"] == "all-to-all" and s.trigger.mapping == "all-to-all"
    expected = evaluate_subset(s.model, s.test, s.trigger, 2000)  # what the Overview measures on an upload
    assert expected.n_poisoned == expected.n_clean  # all-to-all: every test image is triggered
    assert at.metric[1].value == f"{100 * expected.asr:.1f}%" and at.metric[2].value == f"{100 * expected.ra:.1f}%"
    assert f"{expected.n_poisoned} triggered" in page_text(at)
    assert metric_definitions(s.trigger)["asr"] in page_text(at) and OLD not in page_text(at)


def test_upload_form_refuses_sig_all_to_all_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path / "runs"))
    raw = (DEMO_SUSPECTS / "badnets" / "model.safetensors").read_bytes()
    at = _upload(open_app("demo:badnets"), "sig.safetensors", raw, "sig", "all-to-all")
    errors = [e.value for e in at.sidebar.error]
    assert errors == ["sig is a clean-label attack and supports only all-to-one"], errors
    assert not (tmp_path / "runs" / "uploads").exists() or not any((tmp_path / "runs" / "uploads").iterdir())
    assert "badnets" in at.title[0].value  # the app stays on the suspect it showed
