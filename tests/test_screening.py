"""Input screening (STRIP, SCALE-UP, IBD-PSC) on the real demo suspects, with small subsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import analysis.screening as screening
import suspects
from analysis.screening import (
    calibrate,
    calibrate_on_pool,
    get_screener,
    list_screeners,
    load_image,
    screen_images,
    screen_suspect,
)
from backdoor_lens.cli import main
from suspects.triggers import make_trigger

pytestmark = pytest.mark.usefixtures("one_thread")

POOL, LIMIT = 200, 200


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


@pytest.fixture(scope="module")
def badnets_results(badnets):
    """One screen of 200 pool and 200 test images per method (shared by the tests that only read results)."""
    return {m: screen_suspect(badnets, m, n_pool=POOL, limit=LIMIT) for m in list_screeners()}


def _png(tensor: torch.Tensor, path) -> None:
    Image.fromarray((tensor[0] * 255).round().byte().numpy(), "L").save(path)


def test_registry_holds_the_three_methods_with_their_teaching_text():
    assert list_screeners() == ["strip", "scale-up", "ibd-psc"]
    for name in list_screeners():
        s = get_screener(name)
        assert s.title and s.paper and len(s.summary) > 100 and s.forward_passes() >= 2
        assert get_screener(name, "paper").params is not None
    assert get_screener("strip", "paper").params.n == 100 and get_screener("strip").params.n < 100
    assert get_screener("IBD_PSC").name == "ibd-psc"
    with pytest.raises(ValueError, match="unknown screening method 'foo'"):
        get_screener("foo")
    with pytest.raises(ValueError, match="unknown parameter"):
        get_screener("strip", params={"nn": 3})
    with pytest.raises(ValueError, match="'n' must lie in"):
        get_screener("strip", params={"n": 1})
    with pytest.raises(RuntimeError, match="fit"):
        get_screener("strip").scores(torch.nn.Linear(1, 1), torch.zeros(1, 1, 8, 8))


def test_calibrate_leaves_at_most_the_target_share_above():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1000)
    for fpr in (0.0, 0.01, 0.05, 0.2):
        t = calibrate(scores, fpr)
        above = (scores > t).mean()
        assert above <= fpr + 1e-12
        assert (scores >= t).mean() > fpr  # the next lower threshold would flag too many
    ties = np.r_[np.zeros(90), np.ones(10)]
    assert calibrate(ties, 0.05) == 1.0 and calibrate(ties, 0.1) == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="false-positive rate"):
            calibrate(scores, bad)
    with pytest.raises(ValueError, match="at least one"):
        calibrate([], 0.05)


@pytest.mark.parametrize("method,minimum", [("strip", 0.97), ("scale-up", 0.85), ("ibd-psc", 0.95)])
def test_screening_auroc_on_badnets_is_well_above_chance(badnets, badnets_results, method, minimum):
    # measured on these 200 clean + 172 triggered images: STRIP 1.000, SCALE-UP 0.938, IBD-PSC 0.999
    r = badnets_results[method]
    assert r.n_clean == LIMIT and r.n_triggered == int((badnets.test.labels[:LIMIT] != 0).sum())
    assert r.auroc is not None and r.auroc >= minimum
    assert r.tpr_at_fpr >= 0.75
    assert r.fpr <= 0.15 and r.fpr_pool <= 0.05
    assert len(r.roc_fpr) == len(r.roc_tpr) >= 3 and r.roc_fpr[0] == 0.0 and r.roc_tpr[-1] == 1.0
    assert sum(r.hist_clean) == LIMIT and sum(r.hist_triggered) == r.n_triggered
    assert sum(r.hist_pool) == r.n_pool and len(r.hist_edges) == len(r.hist_clean) + 1
    d = json.loads(json.dumps(r.to_dict(ndigits=4)))
    assert {"method", "auroc", "tpr_at_fpr", "fpr", "threshold", "seconds"} <= set(d)
    assert "scores_clean" not in d and len(r.to_dict(scores=True)["scores_clean"]) == LIMIT


def test_a_clean_model_gives_the_trigger_no_special_score():
    """The demo's clean model with the BadNets patch stamped on: the detectors react to a backdoor, not to the
    patch (measured on 120 pool + 150 test images: AUROC 0.47 STRIP, 0.45 IBD-PSC)."""
    clean = suspects.load("demo:clean")
    clean._trigger_override = make_trigger("badnets", clean.input_shape, clean.num_classes)
    for method in ("strip", "ibd-psc"):
        r = screen_suspect(clean, method, n_pool=120, limit=150)
        assert r.auroc < 0.7 and r.tpr_at_fpr < 0.2, method


def test_threshold_comes_from_pool_images_only(badnets, monkeypatch):
    seen: list[np.ndarray] = []
    real = screening.calibrate

    def spy(scores, fpr=0.05):
        seen.append(np.array(scores, copy=True))
        return real(scores, fpr)

    monkeypatch.setattr(screening, "calibrate", spy)
    a = screen_suspect(badnets, "strip", n_pool=100, limit=30)
    b = screen_suspect(badnets, "strip", n_pool=100, limit=60)
    assert len(seen) == 2 and a.threshold == b.threshold  # more test images change nothing about the threshold
    cal = a.calibration
    reserved = cal.screener.reserved_pool
    assert len(reserved) == cal.screener.params.n and not set(reserved.tolist()) & set(cal.pool_index.tolist())
    assert len(seen[0]) == 100 - len(reserved) == a.n_pool
    # what calibrate saw is exactly the scores of those pool images, recomputed
    pool_x = badnets.defense_pool.images(torch.arange(100))[cal.pool_index]
    np.testing.assert_allclose(seen[0], cal.screener.scores(badnets.model, pool_x), rtol=1e-9, atol=1e-9)
    # and none of them is a test image's score
    assert not np.isin(np.round(a.scores_clean, 9), np.round(seen[0], 9)).any()


@pytest.mark.parametrize("method", ["strip", "ibd-psc"])
def test_triggered_image_flagged_and_its_clean_copy_not(badnets, badnets_results, tmp_path, method):
    """Through PNG files, as a user would upload them: the first 10 non-target test images and their triggered
    copies (measured: 10/10 triggered flagged for both; 9/10 and 10/10 clean copies pass)."""
    test = badnets.test
    idx = torch.nonzero(test.labels[:LIMIT] != badnets.trigger.target).flatten()[:10]
    x = test.images(idx)
    xt = badnets.trigger(x)
    paths = []
    for i in range(len(idx)):
        _png(x[i], tmp_path / f"clean_{i}.png")
        _png(xt[i], tmp_path / f"triggered_{i}.png")
        paths += [tmp_path / f"clean_{i}.png", tmp_path / f"triggered_{i}.png"]
    cal = badnets_results[method].calibration
    verdicts = screen_images(badnets, method, paths, calibration=cal)
    clean = [v for v in verdicts if Path(v.name).name.startswith("clean_")]
    trig = [v for v in verdicts if Path(v.name).name.startswith("triggered_")]
    assert len(clean) == len(trig) == 10
    assert all(v.flagged and v.predicted == 0 and v.verdict == "likely triggered" for v in trig)
    assert sum(not v.flagged for v in clean) >= 8
    pairs = [(c, t) for c, t in zip(clean, trig, strict=True) if not c.flagged]
    assert all(t.score > t.threshold >= c.score for c, t in pairs)
    # the file round trip is exact (28x28 PNG, no resizing): the score of the tensor itself
    direct = cal.screener.scores(badnets.model, xt[:1])
    assert trig[0].score == pytest.approx(float(direct[0]), rel=1e-4)  # float32 sums differ by batch


def test_screen_images_without_a_calibration(badnets, tmp_path):
    x = badnets.test.images(torch.tensor([1]))
    _png(badnets.trigger(x)[0], tmp_path / "t.png")
    out = screen_images(badnets, "scale-up", [tmp_path / "t.png"], threshold=0.5)
    assert out[0].threshold == 0.5 and out[0].flagged and out[0].predicted_class == badnets.classes[0]
    cal = calibrate_on_pool(badnets, "scale-up", n_pool=POOL)
    again = screen_images(badnets, "scale-up", [Image.open(tmp_path / "t.png")], n_pool=POOL)
    assert again[0].threshold == cal.threshold and again[0].name == str(tmp_path / "t.png")
    with pytest.raises(ValueError, match="calibration is for 'scale-up', not 'strip'"):
        screen_images(badnets, "strip", [tmp_path / "t.png"], calibration=cal)


def test_images_are_converted_and_resized(tmp_path):
    rgb = np.zeros((64, 48, 3), np.uint8)
    rgb[:, :, 0] = 255
    Image.fromarray(rgb, "RGB").save(tmp_path / "red.jpg", quality=95)
    t = load_image(tmp_path / "red.jpg", (1, 28, 28))
    assert t.shape == (1, 28, 28) and 0.2 < float(t.mean()) < 0.4  # red in greyscale: 0.299
    pal = Image.fromarray(np.full((28, 28), 200, np.uint8), "L").convert("P")
    pal.save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png", (3, 32, 32)).shape == (3, 32, 32)
    rgba = Image.new("RGBA", (30, 30), (255, 255, 255, 128))
    rgba.save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png", (1, 28, 28)).shape == (1, 28, 28)
    exact = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    Image.fromarray(exact, "L").save(tmp_path / "exact.png")
    assert torch.equal((load_image(tmp_path / "exact.png", (1, 28, 28))[0] * 255).round().byte(),
                       torch.from_numpy(exact))


def test_bad_images_get_clear_messages(tmp_path):
    shape = (1, 28, 28)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt is not a readable PNG or JPEG image"):
        load_image(tmp_path / "notes.txt", shape)
    with pytest.raises(ValueError, match=r"missing\.png: no such file"):
        load_image(tmp_path / "missing.png", shape)
    Image.new("L", (28, 28)).save(tmp_path / "a.gif")
    with pytest.raises(ValueError, match=r"a\.gif is a GIF image; only PNG and JPEG"):
        load_image(tmp_path / "a.gif", shape)
    Image.fromarray(np.full((28, 28), 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match=r"deep\.png has pixel mode 'I;16'.*8-bit"):
        load_image(tmp_path / "deep.png", shape)
    Image.new("L", (4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match=r"tiny\.png is 4x4 pixels; images need at least 8"):
        load_image(tmp_path / "tiny.png", shape)
    Image.new("L", (64, 64)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cut\.png"):
        load_image(tmp_path / "cut.png", shape)
    with pytest.raises(ValueError, match="4-channel input"):
        load_image(tmp_path / "full.png", (4, 28, 28))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        screening.list_image_files(tmp_path / "empty")


# --- the command line ----------------------------------------------------------------------------------------


def test_cli_json_keys_and_per_image_results(badnets, tmp_path, capsys):
    x = badnets.test.images(torch.tensor([1, 2]))
    _png(badnets.trigger(x)[0], tmp_path / "triggered.png")
    _png(x[1], tmp_path / "clean.png")
    code = main(["screen", "demo:badnets", "--method", "scale-up", "--limit", "60", "--pool-size", "150",
                 "--images", str(tmp_path), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("method", "auroc", "tpr_at_fpr", "fpr", "threshold", "seconds", "images", "fpr_target"):
        assert key in out
    assert out["method"] == "scale-up" and out["n_clean"] == 60 and out["fpr_target"] == 0.05
    assert all(len(str(v).split(".")[-1]) <= 4 for v in (out["auroc"], out["threshold"], out["seconds"]))
    imgs = {Path(d["name"]).name: d for d in out["images"]}
    assert set(imgs) == {"clean.png", "triggered.png"}
    assert imgs["triggered.png"]["flagged"] and imgs["triggered.png"]["verdict"] == "likely triggered"
    assert {"score", "threshold", "predicted", "predicted_class"} <= set(imgs["clean.png"])


def test_cli_human_output(capsys):
    assert main(["screen", "demo:badnets", "--method", "ibd-psc", "--limit", "40", "--pool-size", "120",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "IBD-PSC on badnets" in text and "AUROC" in text and "threshold" in text


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    Image.new("L", (28, 28)).save(tmp_path / "ok.png")
    (tmp_path / "readme.txt").write_text("hello")
    assert main(["screen", "demo:badnets", "--images", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "readme.txt" in err and err.startswith("backdoor-lens screen: error:")
    assert main(["screen", "demo:badnets", "--method", "foo"]) == 2
    assert "unknown screening method 'foo'" in capsys.readouterr().err
    assert main(["screen", "demo:badnets", "--fpr", "1.5", "--method", "scale-up"]) == 2
    assert "false-positive rate" in capsys.readouterr().err
    assert main(["screen", "demo:badnets", "--set", "n=0"]) == 2
    assert "'n' must lie in" in capsys.readouterr().err
    assert main(["screen", "demo:badnets", "--images", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_cli_help_lists_the_options():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "backdoor_lens.cli", "screen", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "usage: backdoor-lens screen" in r.stdout
    for flag in ("--method", "--images", "--json", "--fpr", "--device", "--preset"):
        assert flag in r.stdout
