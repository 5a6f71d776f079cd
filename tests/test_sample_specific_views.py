"""Views on a sample-specific trigger (issue 30): the trigger-attention share, the recovered-trigger overlap and the
Grad-CAM page use each image's own trigger pixels (``Trigger.footprints``), not the union over the images; a trigger
that is the same on every image keeps the numbers it had."""

from pathlib import Path

import numpy as np
import pytest
import torch

import suspects
from analysis.gradcam import attention_share, compare_gradcam, strongest_pixels
from analysis.reverse import known_footprint_share, known_trigger_overlap, trigger_overlap
from analysis.samples import paired_sample
from suspects.triggers import make_trigger

SHAPE = (1, 28, 28)
APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def badnets():
    return suspects.load("demo:badnets")


def bright_pixel_trigger():
    """An input-aware trigger whose mask generator is the identity: each image's bright pixels carry its trigger, so
    different images have different, known trigger pixels (no training needed)."""
    trig = make_trigger("inputaware", SHAPE, 10, target=0, gen_width=4)
    trig.mask_net = torch.nn.Identity()
    return trig


def test_footprints_default_and_input_aware():
    badnets = make_trigger("badnets", SHAPE, 10)
    x = torch.rand((3, *SHAPE), generator=torch.Generator().manual_seed(0))
    fps = badnets.footprints(x)
    assert not badnets.sample_specific and fps.shape == (3, 28, 28)
    assert all(torch.equal(f, badnets.footprint(x)) for f in fps)  # the shared footprint, repeated
    trig = bright_pixel_trigger()
    x = torch.zeros(2, *SHAPE)
    x[0, :, :10] = 1.0
    x[1, :, 20:] = 1.0
    fps = trig.footprints(x)
    assert trig.sample_specific and fps.shape == (2, 28, 28)
    assert torch.equal(fps[0], trig.footprint(x[0])) and torch.equal(fps[1], trig.footprint(x[1]))
    assert fps[0][:10].all() and not fps[0][10:].any() and fps[1][20:].all() and not fps[1][:20].any()


def stored(attack: str):
    """A stored trigger (as a BackdoorBench import makes) of three flat 28x28 test images, each poisoned on its own
    row, and those clean images."""
    from suspects.stored_trigger import KIND_TEST, StoredImages, StoredTrigger, image_keys

    clean = np.zeros((3, 1, 28, 28), dtype=np.uint8) + np.arange(3, dtype=np.uint8)[:, None, None, None]
    poisoned = clean.copy()
    for i in range(3):
        poisoned[i, :, 5 * i, :] = 255
    images = StoredImages(image_keys(clean), poisoned, np.full(3, KIND_TEST), np.arange(3), np.ones(3, int),
                          np.zeros(3, int), (poisoned != clean).any((0, 1)))
    return StoredTrigger(SHAPE, 10, images, info={"lens_attack": attack}), torch.from_numpy(clean).float() / 255


def test_stored_trigger_of_a_sample_specific_attack():
    trig, x = stored("inputaware")
    assert trig.sample_specific
    fps = trig.footprints(x)
    for i in range(3):  # each image's own stored copy: its own row
        assert fps[i][5 * i].all() and int(fps[i].sum()) == 28
    other = torch.zeros(1, *SHAPE) + 0.5  # no stored copy: the stored pairs' footprint
    assert torch.equal(trig.footprints(other)[0], trig.footprint())
    patch, x = stored("badnets")
    assert not patch.sample_specific
    assert all(torch.equal(f, patch.footprint(x)) for f in patch.footprints(x))  # shared, as before


def test_attention_share_takes_each_maps_own_footprint():
    cams = np.ones((2, 4, 4), dtype=np.float32)
    cams[1, 0, 0] = 5.0
    fps = np.zeros((2, 4, 4), dtype=bool)
    fps[0, 0, :] = True  # 4 of 16 pixels
    fps[1, 0, 0] = True  # the map's peak: 5 of 20
    assert attention_share(cams, fps) == pytest.approx([4 / 16, 5 / 20])
    assert attention_share(cams, fps.any(0)) == pytest.approx([4 / 16, 8 / 20])  # the union counts image 0's pixels too
    with pytest.raises(ValueError, match="per-image footprints"):
        attention_share(cams, fps[:1])


def test_gradcam_share_on_each_images_own_trigger(badnets):
    trig = bright_pixel_trigger()
    smp = paired_sample(badnets.test, trig, 4)
    res = compare_gradcam(badnets.model, smp, trig)
    assert res.sample_specific and res.footprints.shape == (4, 28, 28)
    own = [trig.footprint(smp.clean[i:i + 1]).numpy() for i in range(4)]
    assert not np.array_equal(own[0], own[1])
    assert np.array_equal(res.footprint, np.any(own, axis=0))  # drawn: where any image's trigger lies
    assert res.footprint_fraction == pytest.approx(np.mean([o.mean() for o in own]))
    for i in range(2):  # by hand: the map's mass on its own image's trigger pixels
        for cams, share in ((res.clean_cams, res.clean_share), (res.triggered_cams, res.triggered_share)):
            assert share[i] == pytest.approx(float((cams[i] * own[i]).sum() / cams[i].sum()), rel=1e-5)
    union = attention_share(res.triggered_cams, res.footprint)
    assert not np.allclose(union, res.triggered_share)  # the union would count other images' trigger pixels
    assert (union >= res.triggered_share - 1e-6).all()
    strong = strongest_pixels(trig, smp.clean, per_image=True)
    assert strong.shape == (4, 28, 28) and np.array_equal(res.strongest, strong)


def test_badnets_numbers_unchanged(badnets):
    """A trigger that is the same on every image: the shared footprint of the first 16 images, as before."""
    trig = badnets.trigger
    smp = paired_sample(badnets.test, trig, 24)
    res = compare_gradcam(badnets.model, smp, trig)
    fp = trig.footprint(smp.clean[:16]).numpy()
    assert res.footprints is None and not res.sample_specific
    assert np.array_equal(res.footprint, fp) and res.footprint_fraction == float(fp.mean())
    assert np.array_equal(res.clean_share, attention_share(res.clean_cams, fp))
    assert np.array_equal(res.triggered_share, attention_share(res.triggered_cams, fp))
    assert np.array_equal(res.strongest, strongest_pixels(trig, smp.clean[:24]))
    mask = np.random.default_rng(0).random((28, 28))
    assert known_trigger_overlap(mask, trig, smp.clean) == trigger_overlap(mask, trig.footprint().numpy())
    assert known_footprint_share(trig, smp.clean) == float(trig.footprint().float().mean())


def test_recovered_mask_overlap_per_image(badnets):
    trig = bright_pixel_trigger()
    x = badnets.test.images(torch.arange(2))
    mask = np.zeros((28, 28))
    mask[8:20, 8:20] = 1.0
    ov = known_trigger_overlap(mask, trig, x)
    by_hand = [trigger_overlap(mask, trig.footprint(x[i:i + 1]).numpy()) for i in range(2)]
    assert ov["per_image"] == 2
    for key in ("mass_on_trigger", "iou", "mass_on_mirror", "footprint_share"):
        assert ov[key] == pytest.approx(np.mean([b[key] for b in by_hand]))
    assert ov["mass_on_trigger"] != pytest.approx(trigger_overlap(mask, trig.footprint(x).numpy())["mass_on_trigger"])
    assert known_footprint_share(trig, x) == pytest.approx(np.mean([b["footprint_share"] for b in by_hand]))


def save_untrained_iad(badnets, folder: Path):
    """The demo BadNets weights under an input-aware trigger whose generators keep their seeded initialisation (no
    training): every image gets its own, different trigger pixels."""
    from suspects.store import Suspect, save

    trig = make_trigger("inputaware", SHAPE, 10, target=0, gen_width=4)
    card = {k: v for k, v in badnets.card.items() if k not in ("poison", "metrics", "training", "created")}
    card.update(name="inputaware (untrained generators)", trigger=trig.spec())
    return trig, save(Suspect(badnets.model, card), folder)


def test_detect_cli_compares_with_each_images_own_trigger(badnets, tmp_path, capsys):
    import json

    from analysis.reverse import ScanConfig, scan_images
    from backdoor_lens.cli import main

    trig, folder = save_untrained_iad(badnets, tmp_path / "iad")
    assert main(["detect", str(folder), "--images", "20", "--steps", "1", "--runs", str(tmp_path / "runs"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ov = out["overlap_with_known_trigger"]
    x = scan_images(suspects.load(str(folder)), ScanConfig(n_images=20, steps=1))
    assert ov["per_image"] == 20 and out["known_attack"] == "inputaware"
    assert ov["footprint_share"] == pytest.approx(known_footprint_share(trig, x), abs=1e-3)  # --json rounds
    assert ov["footprint_share"] < 0.5 < float(trig.footprint(x).float().mean())  # own pixels, not the union


def test_gradcam_page_on_an_inputaware_suspect(badnets, runs_dir):
    """An untrained input-aware trigger (generators at their seeded initialisation) on the demo weights: the page
    renders, measures per image, and draws each image's own trigger pixels."""
    from streamlit.testing.v1 import AppTest

    trig, folder = save_untrained_iad(badnets, runs_dir / "uploads" / "iad")  # where the picker finds it
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params["suspect"] = str(folder)
    at.session_state["sample_size"] = 100
    at.run()
    assert not at.exception, at.exception
    assert "untrained generators" in at.title[0].value
    at.switch_page("views/gradcam.py")
    at.session_state["cam_n"] = 8
    at.run()
    assert not at.exception, at.exception
    assert any("own trigger pixels" in c.value for c in at.caption)
    metrics = {m.label: float(m.value.rstrip("%")) for m in at.metric}
    # per image the random generators cover about a third of the image; their union over 8 images is most of it
    x = paired_sample(suspects.load(str(folder)).test, trig, 8).clean
    assert metrics["Footprint share of the image"] == pytest.approx(100 * float(trig.footprints(x).float().mean()),
                                                                    abs=0.06)
    assert "Trigger-attention share, triggered inputs" in metrics
    assert any("Each image's own trigger pixels" in c.value for c in at.caption)


def test_detection_page_on_an_inputaware_suspect(badnets, runs_dir):
    """The known-trigger comparison takes each scan image's own trigger pixels, and draws a pool image's own."""
    from streamlit.testing.v1 import AppTest

    _, folder = save_untrained_iad(badnets, runs_dir / "uploads" / "iad")
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params["suspect"] = str(folder)
    at.session_state["sample_size"] = 60
    at.run()
    at.switch_page("views/detection.py").run()
    assert not at.exception, at.exception
    at.number_input[0].set_value(20)
    at.number_input[1].set_value(1)
    at.button[0].click().run()  # the form's "Scan all classes"
    assert not at.exception, at.exception
    assert any("each of 20 scan images' own trigger pixels" in m.value for m in at.markdown)
    assert any("sample-specific trigger" in i.value for i in at.info)
