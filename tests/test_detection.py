"""Issue 7: stored Neural Cleanse scans, recovered triggers, the `detect` command and the Detection page."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

import suspects
from analysis.figures import FOOTPRINT_BACKGROUND, FOOTPRINT_RGB, footprint_tile
from analysis.reverse import (
    SAMPLE_SPECIFIC_TRIGGERS,
    ScanConfig,
    recovered_trigger_spec,
    scope_note,
    trigger_overlap,
)
from backdoor_lens.cli import main
from runs.scans import save_recovered_suspect, scan_suspect, stored_scan
from suspects.metrics import evaluate
from suspects.store import adopt_trigger
from suspects.triggers import list_triggers, make_trigger

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
TINY = ScanConfig(n_images=60, steps=8)


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


@pytest.fixture(scope="module")
def tiny_scan(badnets, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, scan_suspect(badnets, TINY, cache_root=root)


def test_recovered_trigger_stamps_mask_and_pattern_and_refuses_bad_shapes():
    mask = np.zeros((28, 28), np.float32)
    mask[:3, :3] = 1.0
    pattern = np.full((1, 28, 28), 0.25, np.float32)
    trig = make_trigger("recovered", (1, 28, 28), 10, target=3, mask=mask.tolist(), pattern=pattern.tolist())
    x = torch.ones(2, 1, 28, 28)
    out = trig(x)
    assert torch.allclose(out[:, :, :3, :3], torch.full((2, 1, 3, 3), 0.25)) and out[:, :, 3:, :].eq(1).all()
    assert trig.footprint().sum() == 9 and trig.target_labels(torch.tensor([5])).item() == 3
    again = make_trigger("recovered", (1, 28, 28), 10, target=3, **trig.spec()["params"])
    assert torch.equal(again(x), out)
    with pytest.raises(ValueError, match="mask must be"):
        make_trigger("recovered", (1, 28, 28), 10, mask=[[0.0]], pattern=pattern.tolist())
    assert "recovered" not in list_triggers() and "recovered" in list_triggers(include_recovered=True)


def test_scan_is_stored_and_reused(badnets, tiny_scan):
    root, first = tiny_scan
    assert first.masks.shape == (10, 28, 28) and first.patterns.shape == (10, 1, 28, 28)
    assert first.config["images"] == 60 and first.config["source"] == "defense pool"
    again = stored_scan(badnets, TINY, root)
    assert again is not None and np.allclose(again.l1, first.l1, equal_nan=True) and again.flagged == first.flagged
    assert stored_scan(badnets, ScanConfig(n_images=60, steps=9), root) is None  # another budget is another scan
    # a corrupted stored scan is not trusted: it is recomputed
    files = list(Path(root, "detections").rglob("*.npz"))
    assert len(files) == 1
    files[0].write_bytes(b"garbage")
    assert stored_scan(badnets, TINY, root) is None
    with pytest.raises(ValueError, match="steps"):
        scan_suspect(badnets, ScanConfig(steps=0))


def test_adopted_trigger_drives_metrics_and_survives_save(badnets, tiny_scan, tmp_path):
    _, result = tiny_scan
    adopted = adopt_trigger(badnets, recovered_trigger_spec(result, 0), parent="demo:badnets")
    assert adopted.trigger.name == "recovered" and adopted.card["true_trigger"]["name"] == "badnets"
    assert "poison" not in adopted.card  # the poisoned training set belongs to the known trigger
    m = evaluate(adopted.model, adopted.test, adopted.trigger, limit=300)
    # the recovered class-0 trigger flips the backdoored model's test images to class 0 far more than chance
    assert m.asr > 0.5, m
    folder = save_recovered_suspect(badnets, result, 0, tmp_path, parent="demo:badnets")
    loaded = suspects.load(folder)
    assert loaded.trigger.name == "recovered" and loaded.trigger.target == 0
    assert "recovered trigger (class 0)" in loaded.name
    x = loaded.test.images(np.arange(4))
    assert torch.allclose(loaded.trigger(x), adopted.trigger(x), atol=1e-4)


def test_trigger_overlap_definition():
    mask = np.zeros((4, 4))
    mask[0, 0], mask[0, 1] = 1.0, 1.0
    fp = np.zeros((4, 4), bool)
    fp[0, 0] = True
    ov = trigger_overlap(mask, fp)
    assert ov["mass_on_trigger"] == 0.5 and ov["iou"] == 0.5 and ov["footprint_share"] == 1 / 16


def test_detect_cli_json_and_adopt(tmp_path, capsys):
    rc = main(["detect", "demo:badnets", "--images", "40", "--steps", "4", "--runs", str(tmp_path), "--json",
               "--adopt", "auto"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["l1"]) == len(out["anomaly_index"]) == 10
    assert {"flagged", "seconds", "verdict", "known_target", "overlap_with_known_trigger"} <= set(out)
    ai = np.array([np.nan if a is None else a for a in out["anomaly_index"]])  # None: the class did not converge
    assert out["adopted"]["class"] == (int(np.nanargmax(ai)) if np.isfinite(ai).any() else out["most_suspicious"])
    assert suspects.load(out["adopted"]["path"]).trigger.name == "recovered"
    assert out["stored"] is False and out["created"]
    # the same scan again is read back from the store, and the output says so, with its date and its seconds
    assert main(["detect", "demo:badnets", "--images", "40", "--steps", "4", "--runs", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"stored scan of {out['created']} (it took {out['seconds']:.1f} s then" in text
    # converged = epoch success >= 0.99, and every converged class's row shows such an epoch success (issue 27.7)
    rows = [ln[22:].split() for ln in text.splitlines() if ln[:5].strip().isdigit()]  # after "    k  name(14) "
    assert len(rows) == 10
    for row, conv in zip(rows, out["converged"], strict=True):  # mask L1, anomaly, epoch success, re-measured
        assert (row[2] != "-" and float(row[2]) >= 0.99) == conv, row
    assert main(["detect", "demo:badnets", "--steps", "0", "--runs", str(tmp_path)]) == 2
    assert "steps must lie" in capsys.readouterr().err


def test_scope_note_says_what_neural_cleanse_cannot_find():
    assert "full-image" in scope_note("clean") and "patch" in scope_note("clean")
    sig = scope_note("suspicious", 1.0, "sig")
    assert "(sig) changes 100% of the image" in sig and "cannot find a full-image trigger" in sig
    assert scope_note("clean", 1.0, "blended").startswith("The known trigger (blended)")
    assert scope_note("suspicious", 0.01, "badnets") == "" and scope_note("flagged", 1.0, "sig") == ""


def test_scope_note_of_sample_specific_attacks():
    """Issue 30: input-aware, WaNet, BppAttack and Adaptive-Blend break Neural Cleanse's one-patch assumption, whatever
    their footprint; a patch attack keeps the footprint-based note only."""
    assert {"inputaware", "wanet", "bppattack", "adaptive_blend"} <= set(SAMPLE_SPECIFIC_TRIGGERS)
    assert set(SAMPLE_SPECIFIC_TRIGGERS) <= set(list_triggers())
    for attack in SAMPLE_SPECIFIC_TRIGGERS:
        for level in ("clean", "suspicious", "inconclusive"):
            note = scope_note(level, 0.03, attack, attack=attack)  # a small footprint: no full-image note would come
            assert note.startswith(f"The known attack ({attack}) has a sample-specific trigger")
            assert "no evidence that the model has no backdoor" in note
        assert "not the attack's trigger" in scope_note("flagged", 1.0, attack, attack=attack)
    for attack in ("badnets", "adaptive_patch", "trojannn", None):
        assert scope_note("suspicious", 0.02, attack, attack=attack) == ""
        assert "sample-specific trigger:" not in scope_note("clean", 0.02, attack, attack=attack)
    assert scope_note("suspicious", 1.0, "sig", attack="sig").startswith("The known trigger (sig) changes 100%")


def test_detect_cli_says_what_neural_cleanse_cannot_see_on_wanet(tmp_path, capsys):
    assert main(["detect", "demo:wanet", "--images", "40", "--steps", "2", "--runs", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["known_attack"] == "wanet"
    assert out["scope_note"] == scope_note(out["verdict"], None, "wanet", attack="wanet") != ""
    assert main(["detect", "demo:wanet", "--images", "40", "--steps", "2", "--runs", str(tmp_path)]) == 0
    assert "note: The known attack (wanet) has a sample-specific trigger" in capsys.readouterr().out


def test_footprint_is_drawn_visibly_and_framed():
    """Issue 27.7: the BadNets footprint was white on white and the rounded corners clipped the corner patch."""
    trig = make_trigger("badnets", (1, 28, 28), 10, target=0)
    fp = trig.footprint().numpy()
    tile = footprint_tile(fp, scale=3, pad=4)
    assert tile.shape == (3 * (28 + 8), 3 * (28 + 8), 3)
    inner = tile[12:-12, 12:-12]
    on, off = inner[np.repeat(np.repeat(fp, 3, 0), 3, 1)], inner[~np.repeat(np.repeat(fp, 3, 0), 3, 1)]
    assert (on == FOOTPRINT_RGB).all() and (off == FOOTPRINT_BACKGROUND).all()  # red on grey: never white on white
    assert (tile[:12] == 255).all() and (tile[:, :12] == 255).all()  # a white frame takes the rounded corners
    ys, xs = np.nonzero(fp)
    corner = (int(ys.max()) if ys.max() > 14 else int(ys.min()), int(xs.max()) if xs.max() > 14 else int(xs.min()))
    assert min(corner[0], 27 - corner[0], corner[1], 27 - corner[1]) == 0  # the patch does touch a corner ...
    assert (tile[12 + 3 * corner[0], 12 + 3 * corner[1]] == FOOTPRINT_RGB).all()  # ... and is drawn inside the frame


def _app(suspect_ref: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params["suspect"] = suspect_ref
    at.session_state["sample_size"] = 60
    at.run()
    assert not at.exception, at.exception
    return at


def test_detection_page_scans_and_adopts(monkeypatch, tmp_path):
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path))
    at = _app("demo:badnets")
    at.switch_page("views/detection.py").run()
    assert not at.exception, at.exception
    assert any("No scan of this suspect" in i.value for i in at.info)
    at.number_input[0].set_value(50)
    at.number_input[1].set_value(5)
    at.button[0].click().run()  # the form's "Scan all classes"
    assert not at.exception, at.exception
    verdict = [e.value for e in at.error] + [w.value for w in at.warning] + [i.value for i in at.info]
    assert any("Verdict" in v for v in verdict), verdict
    assert len(at.get("plotly_chart")) == 2
    # the clean reference (issue 13.5): offered with a button, then drawn beside the scan
    at.button(key="scan_reference").click().run()
    assert not at.exception, at.exception
    assert any("Reference: the clean demo model" in c.value for c in at.caption)
    assert not any(b.key == "scan_reference" for b in at.button)  # the button goes once its result is there
    bars = at.get("plotly_chart")[0].proto.spec
    assert "clean reference" in bars
    at.button(key="adopt_go").click().run()
    assert not at.exception, at.exception
    assert "recovered" in at.session_state["suspect"]
    assert any("recovered" in w.value and "not known" in w.value for w in at.warning)


def test_detection_page_says_what_neural_cleanse_cannot_see(monkeypatch, tmp_path):
    """Issue 30: on a sample-specific attack (WaNet's warp) the page notes that the verdict is no evidence of a
    clean model, and its introduction says what the method can see."""
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path))
    at = _app("demo:wanet")
    at.switch_page("views/detection.py").run()
    assert not at.exception, at.exception
    assert any("What it can see: one small, input-agnostic patch" in m.value for m in at.markdown)
    at.number_input[0].set_value(40)
    at.number_input[1].set_value(2)
    at.button[0].click().run()
    assert not at.exception, at.exception
    notes = [i.value for i in at.info if "sample-specific trigger" in i.value]
    assert len(notes) == 1 and notes[0].startswith("The known attack (wanet)"), [i.value for i in at.info]


@pytest.mark.parametrize("page", ["views/gradcam.py", "views/activations.py", "views/shortcuts.py",
                                  "views/overview.py"])
def test_views_accept_a_recovered_trigger(page, badnets, tiny_scan, monkeypatch, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(root))
    folder = save_recovered_suspect(badnets, tiny_scan[1], 0, root, parent="demo:badnets")
    at = _app(str(folder))
    at.switch_page(page).run()
    assert not at.exception, at.exception
    assert any("recovered" in w.value for w in at.warning), [w.value for w in at.warning]
    assert not any("No trigger is known" in i.value for i in at.info)


def test_a_defense_runs_on_the_recovered_trigger(badnets, tiny_scan, tmp_path):
    from defenses import run_defense

    folder = save_recovered_suspect(badnets, tiny_scan[1], 0, tmp_path, parent="demo:badnets")
    adopted = suspects.load(folder)
    # the tiny scan's mask is large (8 epochs: lambda has barely started), so pruning needs more than the quarter of
    # the layer after which l_inf pruning gives up by default; switch that rule off here
    report = run_defense("linf_prune", adopted, "quick", {"give_up_share": 0}, pool_size=200, suspect_ref=str(folder))
    # before/after ASR are measured with the recovered trigger, and l_inf pruning ranked channels with it
    assert report["asr_before"] > 0.5 and report["asr"] < report["asr_before"], report
    assert report.suspect.trigger.name == "recovered"
