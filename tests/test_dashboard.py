"""Dashboard checks with AppTest: every page runs on the demo suspects without an exception."""

import json
from pathlib import Path

from streamlit.proto.Metric_pb2 import Metric as MetricProto
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")


def test_overview_shows_card_and_metrics():
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["suspect"] = "demo:badnets"
    at.run()
    assert not at.exception, at.exception
    assert "badnets" in at.title[0].value
    labels = [m.label for m in at.metric]
    assert labels == ["BA (benign accuracy)", "ASR (attack success rate)", "RA (robust accuracy)"]
    assert float(at.metric[1].value.rstrip("%")) >= 95.0
    captions = " ".join(c.value for c in at.caption)
    assert "excluded" in captions  # the ASR definition is on the page
    # the picker switches suspects and the choice is kept in the query params
    at.selectbox(key="suspect_picker").set_value("demo:clean").run()
    assert not at.exception and "clean" in at.title[0].value
    assert at.query_params["suspect"] == ["demo:clean"] or at.query_params["suspect"] == "demo:clean"
    assert at.metric[1].value == "n/a"



def page_test(suspect: str, sample: int = 100) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params["suspect"] = suspect
    at.session_state["sample_size"] = sample
    at.run()
    assert not at.exception, at.exception
    return at


def test_gradcam_page():
    at = page_test("demo:badnets")
    at.switch_page("views/gradcam.py").run()
    assert not at.exception, at.exception
    shares = {m.label: float(m.value.rstrip("%")) for m in at.metric}
    assert shares["Trigger-attention share, triggered inputs"] > shares["Trigger-attention share, clean inputs"]
    assert "Footprint share of the image" in shares
    at.selectbox(key="cam_method").set_value("EigenCAM").run()
    assert not at.exception, at.exception
    assert any("Xu et al." in md.value for md in at.markdown)
    # the 2 x 2 grid with the clean demo model as reference (it has no trigger of its own)
    assert at.selectbox(key="cam_reference").value == "demo:clean"


def test_gradcam_page_for_a_whole_image_trigger():
    at = page_test("demo:blended")
    at.switch_page("views/gradcam.py").run()
    assert not at.exception, at.exception
    assert any("says nothing" in i.value for i in at.info)  # the page says why the share does not apply
    labels = [m.label for m in at.metric]
    assert "Map shift, clean → triggered" in labels and not any("Trigger-attention share" in x for x in labels)
    shift = float(at.metric[labels.index("Map shift, clean → triggered")].value)
    assert 0.0 < shift <= 1.0


def test_activations_page():
    at = page_test("demo:badnets")
    at.switch_page("views/activations.py").run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 3
    at.radio(key="act_norm").set_value("l1").run()
    assert not at.exception, at.exception
    assert len(at.dataframe) >= 1


def test_features_page_pca_and_umap():
    at = page_test("demo:badnets", sample=200)
    at.switch_page("views/features.py").run()
    assert not at.exception, at.exception
    spec = at.get("plotly_chart")[0].proto.spec
    assert '"dragmode":"lasso"' in spec.replace(" ", "")
    metrics = {m.label: float(m.value) for m in at.metric}
    assert metrics["Separation in full feature space"] > 0.5
    # coloured by kind by default: a legend of at most 4 entries (clean / triggered test, clean / poisoned train)
    names = {t.get("name") for t in json.loads(spec)["data"]}
    assert names <= {"clean test", "triggered test", "clean train", "poisoned train"} and "triggered test" in names
    at.radio(key="emb_colour").set_value("class").run()
    assert not at.exception, at.exception
    legend = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["legend"]
    assert legend["orientation"] == "h"  # classes x kinds entries wrap under the plot
    at.radio(key="emb_method").set_value("UMAP").run()
    assert not at.exception, at.exception
    first = at.get("plotly_chart")[0].proto.spec
    at.run()  # a rerun takes the stored UMAP (computed under a live progress bar) without recomputing
    assert not at.exception, at.exception
    assert at.get("plotly_chart")[0].proto.spec == first


def test_shortcuts_page_and_no_skip_message():
    at = page_test("demo:badnets", sample=100)
    at.switch_page("views/shortcuts.py").run()
    assert not at.exception, at.exception
    # opening the page starts nothing: a button with the estimate does
    assert not at.get("plotly_chart") and not at.metric
    go = at.button(key="run_ablation")
    assert " s)" in go.label and any("about" in i.value for i in at.info)
    go.click().run()
    assert not at.exception, at.exception
    labels = [m.label for m in at.metric]
    assert "Critical block" in labels
    spec = at.get("plotly_chart")[0].proto.spec
    assert "(critical)" in spec
    critical = at.metric[labels.index("Critical block")].value
    # issue 27 item 6: a change's arrow is its sign and its colour its direction (BA falling: down and red)
    for m in at.metric:
        if m.label.endswith("with that block off (γ = 0)"):
            falling = m.proto.delta.startswith("-")
            assert MetricProto.MetricDirection.Name(m.proto.direction) == ("DOWN" if falling else "UP")
            good = falling if m.label.startswith("ASR") else not falling
            assert MetricProto.MetricColor.Name(m.proto.color) == ("GREEN" if good else "RED"), m.label
    at.run()  # the rerun is served from the stored ablation, drawn with the same bar, without an error
    assert not at.exception, at.exception
    assert at.metric[labels.index("Critical block")].value == critical


def test_pages_without_a_trigger_explain_themselves():
    """Issue 27 item 5: a clean model is shown under another suspect's known trigger (README's tour, step 2), with
    a "Trigger from" selector that defaults to the backdoored suspect viewed last, and each page says so."""
    at = page_test("demo:blended")
    at.switch_page("views/activations.py").run()  # a backdoored suspect with its own trigger: that one is used
    assert at.selectbox(key="act_trigger_from:demo:blended").value == "own"
    picker(at).set_value("demo:clean").run()
    for page, key in (("gradcam", "cam"), ("activations", "act"), ("shortcuts", "abl"), ("features", "emb")):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, at.exception
        assert any("No trigger is known" in i.value and "blended (demo)" in i.value for i in at.info), page
        source = at.selectbox(key=f"{key}_trigger_from:demo:clean")
        assert source.value == "demo:blended" and "own" not in source.options, page
    at.switch_page("views/gradcam.py").run()
    at.selectbox(key="cam_trigger_from:demo:clean").set_value("demo:badnets").run()
    assert not at.exception, at.exception
    clean = {m.label: float(m.value.rstrip("%")) for m in at.metric}
    assert len(at.get("image")) >= 16  # clean | triggered pairs, the 2 x 2 grid with the backdoored model
    assert any("backdoored (badnets" in md.value for md in at.markdown)
    bad = page_test("demo:badnets")
    bad.switch_page("views/gradcam.py").run()
    back = {m.label: float(m.value.rstrip("%")) for m in bad.metric}
    key = "Trigger-attention share, triggered inputs"
    assert clean[key] < back[key]  # the clean model looks at the BadNets patch far less than the backdoored one


def test_defenses_page_runs_a_job_that_survives_a_reload(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path))
    at = page_test("demo:badnets")
    at.switch_page("views/defenses.py").run()
    assert not at.exception, at.exception
    titles = [s.value for s in at.subheader]
    assert titles[:6] == ["Shortcut suppression (SSFT)", "l_inf neuron pruning", "Adversarial Weight Masking (AWM)",
                          "Adversarial Neuron Pruning (ANP)", "Fine-Pruning", "Fine-tuning"]
    at.number_input(key="p_finetune_quick_steps").set_value(6)
    at.button(key="run_finetune").click().run()
    assert not at.exception, at.exception
    # a new session (a reload or another tab) sees the same job
    other = page_test("demo:badnets")
    other.switch_page("views/defenses.py").run()
    deadline = time.time() + 240
    labels = []
    while time.time() < deadline:
        other.run()
        labels = [m.label for m in other.metric]
        if "DER" in labels:
            break
        time.sleep(2)
    assert not other.exception, other.exception
    assert "DER" in labels and "ASR" in labels
    assert any(b.key and b.key.startswith("open_") for b in other.button)


def test_defenses_card_follows_what_the_chosen_preset_needs(tmp_path, monkeypatch):
    """Shortcut suppression on a suspect without a trigger: the quick preset (the last block) can run, the paper
    preset (block='auto', the skip ablation on triggered images) is refused on the card with the way out."""
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path))
    at = page_test("demo:clean")
    at.switch_page("views/defenses.py").run()
    assert not at.exception, at.exception
    assert not at.button(key="run_shortcut").disabled and at.button(key="run_linf_prune").disabled
    at.radio(key="preset_shortcut").set_value("paper").run()
    assert not at.exception, at.exception
    assert at.button(key="run_shortcut").disabled
    assert any("needs a trigger" in w.value and "name a block" in w.value for w in at.warning)


def picker(at: AppTest):
    """The sidebar's suspect picker (its key changes when the suspect is chosen elsewhere)."""
    return next(sb for sb in at.sidebar.selectbox if sb.label == "Model under investigation")


def model_caption(at: AppTest) -> str:
    return next(c.value for c in at.caption if c.value.startswith("Model: "))


def test_picker_follows_a_suspect_chosen_elsewhere():
    """Issue 12 item 1: a page's "Open" button (or an upload, or Adopt) sets the suspect; the picker and every
    page's model line then name that model."""
    at = page_test("demo:badnets")
    assert picker(at).value == "demo:badnets" and "badnets (demo)" in model_caption(at)
    at.session_state["suspect"] = "demo:clean"  # what "Open the repaired model" does, then it switches page
    at.switch_page("views/gradcam.py").run()
    assert not at.exception, at.exception
    assert picker(at).value == "demo:clean" and "clean (demo)" in model_caption(at)
    at.switch_page("views/activations.py").run()
    assert picker(at).value == "demo:clean" and "clean (demo)" in model_caption(at)
    picker(at).set_value("demo:blended").run()  # and the picker still works
    assert not at.exception, at.exception
    assert picker(at).value == "demo:blended" and "blended (demo)" in model_caption(at)


def test_uploads_fail_in_one_line_and_the_demo_weights_load(tmp_path, monkeypatch):
    """Issue 12 items 2 and 3: a text file, a truncated file and a malicious pickle each give one line naming the
    user's file (details in an expander), the app keeps working; the demo's own weights load without touching
    the width (read off the weights)."""
    import os

    import torch

    from suspects.store import DEMO_SUSPECTS

    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path / "runs"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = (DEMO_SUSPECTS / "badnets" / "model.safetensors").read_bytes()
    evil = tmp_path / "evil.pt"
    torch.save({"linear.weight": Payload()}, evil)
    cases = {
        "notes.pt": (b"these are my notes, not a model\n", "notes.pt: not a checkpoint"),
        "cut.safetensors": (good[: len(good) // 2], "cut.safetensors: truncated or corrupted"),
        "evil.pt": (evil.read_bytes(), "refused to load evil.pt: it asks to run code"),
    }
    at = page_test("demo:badnets")
    for name, (raw, expected) in cases.items():
        at.file_uploader(key="upload_file").set_value((name, raw, "application/octet-stream")).run()
        at.button(key="upload_go").click().run()
        assert not at.exception, (name, at.exception)
        errors = [e.value for e in at.sidebar.error]
        assert len(errors) == 1 and errors[0].startswith(expected), (name, errors)
        assert "\n" not in errors[0] and "weights_only" not in errors[0] and "upload." not in errors[0]
        assert len(errors[0].split()) <= 20, errors[0]
        assert picker(at).value == "demo:badnets" and "badnets" in at.title[0].value  # the app still works
    assert not marker.exists()
    assert any(e.label == "Details" for e in at.sidebar.expander)
    # the demo's own weights, the width left empty: read off the weights
    at.file_uploader(key="upload_file").set_value(("badnets-weights.safetensors", good, "application/octet-stream"))
    at.run()
    assert at.number_input(key="upload_width").value is None
    at.button(key="upload_go").click().run()
    assert not at.exception, at.exception
    assert not at.sidebar.error, [e.value for e in at.sidebar.error]
    assert "badnets-weights" in at.title[0].value and "badnets-weights" in model_caption(at)
    assert picker(at).value.startswith(str(tmp_path / "runs" / "uploads" / "badnets-weights-"))


def test_a_damaged_stored_suspect_stops_the_page_in_one_line(tmp_path, monkeypatch):
    """Issue 12 item 2: a suspect folder whose weights are damaged shows one line, not a traceback; the picker
    still switches to another suspect."""
    import shutil

    from suspects.store import DEMO_SUSPECTS

    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path))
    folder = tmp_path / "uploads" / "broken"
    shutil.copytree(DEMO_SUSPECTS / "badnets", folder)
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    at = page_test(str(folder))
    assert [e.value for e in at.error] and "truncated or corrupted" in at.error[0].value
    assert "\n" not in at.error[0].value and not at.title
    picker(at).set_value("demo:clean").run()
    assert not at.exception, at.exception
    assert "clean" in at.title[0].value


def test_the_url_names_a_stored_suspect_without_a_server_path(tmp_path, monkeypatch):
    """Issue 27.8: the page URL carries ``runs:<folder in the run store>``, never the absolute path, and reads back."""
    import suspects

    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path))
    folder = suspects.save(suspects.load("demo:clean"), tmp_path / "recovered" / "clean-copy")
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["suspect"] = str(folder)
    at.run()
    assert not at.exception, at.exception
    url = at.query_params["suspect"]
    url = url[0] if isinstance(url, list) else url
    assert url == "runs:recovered/clean-copy" and str(tmp_path) not in url
    again = AppTest.from_file(APP, default_timeout=120)
    again.query_params["suspect"] = url
    again.run()
    assert not again.exception, again.exception
    assert picker(again).value == str(folder)
