"""BackdoorBench runs built here in BackdoorBench's on-disk format (a tiny model, a few PNGs, an MNIST-layout root).

The clean data is a small MNIST root in torchvision's raw IDX layout (what BackdoorBench reads for ``mnist``);
poisoned images are PNGs under ``record/<run>/bd_*_dataset/<label>/<idx>.png`` and ``attack_result.pt`` holds
the dataset states with numpy arrays, as BackdoorBench writes them. "By hand" numbers come from the original
network applied to the PNG files read with PIL, independently of the importer.
"""

from __future__ import annotations

import copy
import csv
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import suspects
from defenses.common import pool_asr
from suspects.backdoorbench import export_backdoorbench, import_run
from suspects.metrics import evaluate, predict
from suspects.models import create_model, set_skip_gamma
from suspects.store import SuspectLoadError
from suspects.stored_trigger import UncoveredImageError

N_TRAIN, N_TEST, TARGET, K = 60, 30, 0, 10
TRAIN_POISON = [1, 2, 3, 5, 10, 11, 20, 40]  # includes index 10 and 20 (class 0: poisoned, label kept)
TRAIN_NOISE = [4, 6, 7, 13]  # WaNet-style cross samples (non-target classes, keep their label)


def write_idx(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
                     + arr.astype(np.uint8).tobytes())


def badnets(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[-4:, -4:] = 255
    return out


def warp_like(img: np.ndarray, seed: int) -> np.ndarray:
    """A sample-specific change (no affine fit reproduces it), standing in for WaNet's warp or input-aware's
    generated pattern."""
    noise = np.random.default_rng(seed).integers(-40, 41, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def quantise(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """BppAttack's trigger: colour-depth squeezing to 8 levels (a different change per image; no affine fit)."""
    return (np.round(img / 255.0 * 7) / 7 * 255).round().astype(np.uint8)


# attacks whose bd_train also holds label-keeping samples (WaNet / input-aware cross samples, BppAttack negatives)
SAMPLE_SPECIFIC = {"wanet": warp_like, "inputaware": warp_like, "bpp": quantise}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {"train_x": rng.integers(0, 200, (N_TRAIN, 28, 28), dtype=np.uint8),
            "train_y": np.arange(N_TRAIN) % K,
            "test_x": rng.integers(0, 200, (N_TEST, 28, 28), dtype=np.uint8),
            "test_y": (np.arange(N_TEST) * 7) % K}


@pytest.fixture(scope="module")
def net(data):
    """A width-8 PreActResNet-18 that learned the 4x4 white patch (a few full-batch steps on 20 + 20 images)."""
    torch.manual_seed(0)
    model = create_model("preact_resnet18", num_classes=K, in_channels=1, width=8, mean=[0.5], std=[0.5])
    clean = data["train_x"][:20]
    x = torch.from_numpy(np.concatenate([clean, np.stack([badnets(i) for i in clean])]))
    y = torch.cat([torch.from_numpy(data["train_y"][:20]), torch.full((20,), TARGET)])
    x = x.float().div(255).unsqueeze(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(8):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def make_run(base: Path, data: dict, model_sd: dict, *, name: str = "badnet_run", model_name: str = "preactresnet18",
             num_classes: int = K, attack: str = "badnet", clean_data: str = "mnist") -> Path:
    """BackdoorBench's layout: <base>/data/mnist/MNIST/raw/*, <base>/record/<name>/{attack_result.pt, PNGs, ...}."""
    raw = base / "data" / "mnist" / "MNIST" / "raw"
    if not raw.is_dir():
        raw.mkdir(parents=True)
        write_idx(raw / "train-images-idx3-ubyte", data["train_x"])
        write_idx(raw / "train-labels-idx1-ubyte", data["train_y"])
        write_idx(raw / "t10k-images-idx3-ubyte", data["test_x"])
        write_idx(raw / "t10k-labels-idx1-ubyte", data["test_y"])
    run = base / "record" / name
    noise = attack in SAMPLE_SPECIFIC

    def state(split: str, images: np.ndarray, labels: np.ndarray, poisoned: list[int], crossed: list[int]) -> dict:
        indicator = np.zeros(len(labels))  # float64, as BackdoorBench builds it
        data_dict = {}
        for i in poisoned + crossed:
            indicator[i] = 1
            bd = int(labels[i]) if i in crossed else TARGET
            img = SAMPLE_SPECIFIC[attack](images[i], i) if noise else badnets(images[i])
            rel = f"{split}/{labels[i]}/{i}.png"
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(run / rel)
            data_dict[np.int64(i)] = {"path": f"./record/{name}/{rel}", "other_info": [bd, np.int64(labels[i])]}
        folder = f"./record/{name}/{split}"
        return {"poison_indicator": indicator, "original_index_array": np.nonzero(indicator == 1)[0],
                "bd_data_container": {"save_folder_path": folder, "save_file_format": ".png", "data_dict": data_dict},
                "getitem_all": True, "getitem_all_switch": False, "save_folder_path": folder}

    run.mkdir(parents=True)
    test_poison = [int(i) for i in np.nonzero(data["test_y"] != TARGET)[0]]
    result = {
        "model_name": model_name, "num_classes": num_classes, "model": model_sd, "data_path": "./data/mnist",
        "img_size": (28, 28, 1), "clean_data": clean_data,
        "bd_train": state("bd_train_dataset", data["train_x"], data["train_y"], TRAIN_POISON,
                          TRAIN_NOISE if noise else []),
        "bd_test": state("bd_test_dataset", data["test_x"], data["test_y"], test_poison, []),
    }
    torch.save(result, run / "attack_result.pt")
    torch.save({"attack": attack, "attack_target": TARGET, "attack_label_trans": "all2one", "pratio": 0.1},
               run / "info.pickle")
    with open(run / "attack_df.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "test_acc", "test_asr", "test_ra"])
        w.writerow([1, 0.5, 0.9, 0.05])
    return run


def by_hand(model: torch.nn.Module, run: Path, data: dict) -> dict:
    """BA on the clean test split, ASR / RA on the run's PNGs (read with PIL), from the original network."""
    pngs = sorted((run / "bd_test_dataset").glob("*/*.png"), key=lambda p: int(p.stem))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in pngs])).float().div(255).unsqueeze(1)
    orig = torch.tensor([int(p.parent.name) for p in pngs])
    clean = torch.from_numpy(data["test_x"]).float().div(255).unsqueeze(1)
    with torch.no_grad():
        p_clean, p_bd = model(clean).argmax(1), model(x).argmax(1)
    return {"ba": float((p_clean == torch.from_numpy(data["test_y"])).float().mean()),
            "asr": float((p_bd == TARGET).float().mean()), "ra": float((p_bd == orig).float().mean()),
            "n_poisoned": len(pngs), "clean_preds": p_clean, "bd_preds": p_bd, "bd_images": x}


def test_attack_run_round_trip_same_predictions_and_metrics(tmp_path, data, net):
    run = make_run(tmp_path / "bb", data, net.state_dict())
    s = suspects.load(run)  # the data root defaults to BackdoorBench's ./data next to record/
    hand = by_hand(net, run, data)
    assert s.card["arch"] == "preact_resnet18" and s.card["arch_kwargs"] == {"width": 8}
    assert (s.trigger.target, s.trigger.mapping) == (TARGET, "all-to-one")
    assert torch.equal(predict(s.model, s.test.images()), hand["clean_preds"])
    m = evaluate(s.model, s.test, s.trigger)
    assert (m.ba, m.asr, m.ra, m.n_poisoned) == (hand["ba"], hand["asr"], hand["ra"], hand["n_poisoned"])
    clean_hits = float((hand["clean_preds"][torch.from_numpy(data["test_y"]) != TARGET] == TARGET).float().mean())
    assert hand["asr"] > 0.5 > clean_hits  # the metric really sees the run's triggered images
    mask = s.test.labels != TARGET
    assert torch.equal(s.trigger(s.test.images(mask)), hand["bd_images"])
    assert s._plan.poison_idx.tolist() == TRAIN_POISON and s._plan.noise_idx.tolist() == []
    assert s.card["backdoorbench"]["reported"]["asr"] == 0.9
    ds = s.poisoned_train()
    x, label, orig, poisoned = ds[11]
    assert poisoned and label == TARGET and orig == 1
    assert torch.equal((x * 255).round().byte()[0], torch.from_numpy(badnets(data["train_x"][11])))
    # saved as a suspect folder and opened again: same model, stored images, poisoned indices and metrics
    folder = suspects.save(s, tmp_path / "saved")
    assert (folder / "stored_trigger.npz").is_file()
    again = suspects.load(folder)
    assert again.trigger.spec() == s.trigger.spec()
    assert evaluate(again.model, again.test, again.trigger) == m
    assert again.poisoned_train().plan.poison_idx.tolist() == TRAIN_POISON


def test_badnets_run_trigger_poisons_new_images_by_affine_fit(tmp_path, data, net):
    s = import_run(make_run(tmp_path / "bb", data, net.state_dict()))
    assert s.trigger.params["fallback"] == "affine" and s.trigger.params["fit_error"] == 0.0
    pool = s.defense_pool.images()
    assert s.trigger.covers(pool).all()
    expected = np.stack([badnets(i[0]) for i in s.defense_pool.pixels.numpy()])
    assert torch.equal((s.trigger(pool) * 255).round().byte()[:, 0], torch.from_numpy(expected))
    fp = s.trigger.footprint()
    assert fp[-4:, -4:].all() and int(fp.sum()) == 16


def test_wanet_noise_samples_not_counted_and_uncovered_images_refused(tmp_path, data, net):
    run = make_run(tmp_path / "bb", data, net.state_dict(), name="wanet_run", attack="wanet")
    s = import_run(run)
    same = [i for i in TRAIN_POISON if data["train_y"][i] == TARGET]  # warped target-class samples keep their label
    assert same == [10, 20, 40]
    assert s._plan.poison_idx.tolist() == sorted(set(TRAIN_POISON) - set(same))
    assert s._plan.noise_idx.tolist() == sorted(TRAIN_NOISE + same)
    assert s.card["poison"]["n_poisoned"] == len(TRAIN_POISON) - len(same)
    assert s.trigger.params["fallback"] is None and s.trigger.params["fit_error"] > 1.0
    x, label, orig, poisoned = s.poisoned_train()[6]  # a noise sample: warped, keeps its label, not poisoned
    assert not poisoned and label == orig == 6
    assert torch.equal((x * 255).round().byte()[0], torch.from_numpy(warp_like(data["train_x"][6], 6)))
    m = evaluate(s.model, s.test, s.trigger)
    hand = by_hand(net, run, data)
    assert (m.asr, m.ra) == (hand["asr"], hand["ra"])
    pool = s.defense_pool
    x_pool = pool.images()
    assert not s.trigger.covers(x_pool).any()
    with pytest.raises(UncoveredImageError, match="no stored poisoned copy"):
        s.trigger(x_pool[:2])
    assert pool_asr(s.model, x_pool, pool.labels, s.trigger, "cpu") is None


@pytest.mark.parametrize(("attack", "lens"), [("inputaware", "inputaware"), ("bpp", "bppattack")])
def test_sample_specific_run_imports_and_says_what_needs_a_trigger_function(tmp_path, data, net, runs_dir, capsys,
                                                                              attack, lens):
    """Issue 30: input-aware and BppAttack runs open with the run's stored poisoned images as the trigger; the card
    names the attack (BackdoorBench's name and this project's); the summary lists the views and defenses that stamp
    the trigger on other images, and those defenses refuse with the reason."""
    import json

    from analysis.applicability import TRIGGER_FUNCTION_USES
    from backdoor_lens.cli import main
    from defenses.context import DefensePool
    from defenses.registry import all_defenses, get_defense
    from defenses.retrain import knn_monitor
    from suspects.models import NotApplicableError
    from suspects.stored_trigger import attack_name

    run = make_run(tmp_path / "bb", data, net.state_dict(), name=f"{attack}_run", attack=attack)
    assert main(["import-backdoorbench", str(run), "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["attack"], out["lens_attack"]) == (attack, lens)
    hand = by_hand(net, run, data)
    assert (out["metrics"]["asr"], out["metrics"]["ra"]) == (round(hand["asr"], 4), round(hand["ra"], 4))
    stamping = {d.name for d in all_defenses() if d.trigger_needs() is True}
    assert "linf_prune" in stamping and "shortcut" not in stamping  # shortcut's quick preset names its block
    gaps = out["needs_trigger_function"]
    assert set(gaps) == set(TRIGGER_FUNCTION_USES) | stamping | {"shortcut"}, gaps
    assert gaps["shortcut"].startswith("limited: the paper preset stamps the trigger")
    assert {"held-out pool ASR", "stress test", "Neural Cleanse"} <= set(gaps)
    assert all(gaps[v].startswith("limited: ") for v in TRIGGER_FUNCTION_USES)
    assert all(gaps[d].startswith("no: not applicable to this trigger") for d in stamping)
    assert any(lack.startswith("no trigger function") for lack in out["lacks"])
    s = suspects.load(out["suspect"])
    assert s.card["trigger"]["name"] == "stored" and s.card["trigger"]["params"]["lens_attack"] == lens
    assert s.card["backdoorbench"]["lens_attack"] == lens and attack_name(s.trigger) == lens
    assert not s.trigger.applies_to_new_images
    # cross / negative samples keep their label and are not counted as poisoned (format reference, section 7)
    same = [i for i in TRAIN_POISON if data["train_y"][i] == TARGET]
    plan = s.poisoned_train().plan
    assert plan.noise_idx.tolist() == sorted(TRAIN_NOISE + same)
    assert plan.poison_idx.tolist() == sorted(set(TRAIN_POISON) - set(same))
    # what stamps the trigger on defense-pool images refuses, or leaves the held-out ASR out; the rest runs
    for name in sorted(stamping):
        with pytest.raises(NotApplicableError, match="needs a trigger function"):
            get_defense(name).check_applicable(s)
    get_defense("finetune").check_applicable(s)
    shortcut = get_defense("shortcut")
    shortcut.check_applicable(s, shortcut.make_params("quick"))
    with pytest.raises(NotApplicableError, match="needs a trigger function"):
        shortcut.check_applicable(s, shortcut.make_params("paper"))
    train = s.data.train  # clean training images of other classes than the target: none has a stored copy
    keep = torch.nonzero(train.labels != TARGET).flatten()[:20]
    pool = DefensePool(train.images(keep[:10]), train.labels[keep[:10]], train.images(keep[10:]), train.labels[keep[10:]])
    assert pool_asr(s.model, pool.x_val, pool.y_val, s.trigger, "cpu") is None
    assert set(knn_monitor(s.model, pool, s.trigger, "cpu", k=3)()) == {"knn_ba"}  # DBD's monitor: no ASR, no error
    # the printed summary says the same
    assert main(["import-backdoorbench", str(run), "--no-evaluate", "--out", str(tmp_path / "again")]) == 0
    text = capsys.readouterr().out
    assert f"attack: {attack}{'' if attack == lens else f' (Backdoor Lens: {lens})'}, all-to-one" in text
    assert "needs a trigger function" in text and "    - stress test: limited: " in text
    assert "    - shortcut: limited: the paper preset stamps" in text


def test_attack_names_map_onto_registered_attacks():
    from suspects.backdoorbench import ATTACK_NAMES, lens_attack
    from suspects.triggers import list_triggers

    assert lens_attack("bpp") == "bppattack" and lens_attack("WaNet") == "wanet" and lens_attack("dynamic") == "inputaware"
    assert lens_attack("trojannn") == "trojannn" and lens_attack("badnet") == "badnets"
    assert lens_attack("ssba") is None and lens_attack(None) is None
    assert set(ATTACK_NAMES.values()) <= set(list_triggers())


def test_defense_result_opens_repaired_and_exports_round_trip(tmp_path, data, net, runs_dir):
    run = make_run(tmp_path / "bb", data, net.state_dict())
    repaired = copy.deepcopy(net)
    keep = torch.ones_like(repaired.linear.weight)
    keep[:, :20] = 0  # Fine-Pruning: pruned penultimate features
    with torch.no_grad():
        repaired.conv1.weight.mul_(0.9)
    sd = {f"backbone.{k}": v for k, v in repaired.state_dict().items() if not k.startswith("linear.")}  # DBD layout
    sd["linear.weight_orig"], sd["linear.weight_mask"] = repaired.linear.weight.detach().clone(), keep
    sd["linear.bias"] = repaired.linear.bias.detach().clone()
    (run / "defense" / "fp").mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "num_classes": K, "model": sd}, run / "defense" / "fp" / "defense_result.pt")
    with torch.no_grad():
        repaired.linear.weight.mul_(keep)
    s = suspects.load(run / "defense" / "fp", data=str(tmp_path / "bb" / "data"))
    assert s.name == "badnet_run+fp" and s.card["provenance"]["defense"] == "fp"
    hand = by_hand(repaired, run, data)
    m = evaluate(s.model, s.test, s.trigger)
    assert (m.ba, m.asr, m.ra) == (hand["ba"], hand["asr"], hand["ra"])
    # export in BackdoorBench's layout and open that: the same network
    path = export_backdoorbench(s, run, method="lens")
    assert path == run / "defense" / "lens" / "defense_result.pt"
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"model_name", "num_classes", "model"} and obj["model_name"] == "preactresnet18"
    assert list(obj["model"]) == list(net.state_dict())  # BackdoorBench's PreActResNet18 key names and order
    back = suspects.load(run / "defense" / "lens")
    assert evaluate(back.model, back.test, back.trigger) == m
    # skip scales fold into shortcut convolutions; an identity skip cannot be expressed
    set_skip_gamma(s.model, "layer2.0", 0.5)
    export_backdoorbench(s, tmp_path / "out")
    folded = torch.load(tmp_path / "out" / "defense_result.pt", weights_only=True)["model"]
    plain = create_model("preact_resnet18", num_classes=K, in_channels=1, width=8, mean=[0.5], std=[0.5])
    plain.load_state_dict(folded)
    x = s.test.images()
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), s.model(x), atol=1e-5)
    set_skip_gamma(s.model, "layer1.0", 0.0)
    with pytest.raises(SuspectLoadError, match="identity skip"):
        export_backdoorbench(s, tmp_path / "out2")


def test_cli_import_and_export_and_sidebar_lists_import(tmp_path, data, net, runs_dir, capsys):
    import json

    from backdoor_lens.cli import main

    run = make_run(tmp_path / "bb", data, net.state_dict())
    assert main(["import-backdoorbench", str(run), "--data-root", str(tmp_path / "bb" / "data" / "mnist"),
                 "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    hand = by_hand(net, run, data)
    assert out["suspect"] == str(runs_dir.resolve() / "imports" / "badnet_run")
    # --json rounds floats to 4 decimals (issue 12 item 10)
    assert (out["metrics"]["ba"], out["metrics"]["asr"], out["metrics"]["ra"]) == tuple(
        round(hand[k], 4) for k in ("ba", "asr", "ra"))
    assert out["n_train_poisoned"] == len(TRAIN_POISON) and out["reported"]["asr"] == 0.9
    # a patch trigger has a trigger function (the affine fit of the stored pairs): nothing needs one it lacks
    assert (out["attack"], out["lens_attack"], out["needs_trigger_function"]) == ("badnet", "badnets", {})
    from streamlit.testing.v1 import AppTest

    from dashboard.common import stored_suspects

    assert out["suspect"] in stored_suspects()
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py"), default_timeout=120)
    at.query_params["suspect"] = out["suspect"]
    at.run()  # the overview page: the imported suspect, its metrics and its stored triggered examples
    assert not at.exception, at.exception
    assert "badnet_run" in at.title[0].value
    assert [m.value for m in at.metric] == [f"{100 * hand[k]:.1f}%" for k in ("ba", "asr", "ra")]
    assert main(["export-backdoorbench", out["suspect"], "--out", str(tmp_path / "exp")]) == 0
    assert "width 8" in capsys.readouterr().err
    obj = torch.load(tmp_path / "exp" / "defense_result.pt", weights_only=True)
    assert all(torch.equal(obj["model"][k], v) for k, v in net.state_dict().items())
    assert main(["import-backdoorbench", str(run), "--runs", str(runs_dir)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_torchvision_resnet18_run_maps_onto_resnet18_torchvision(tmp_path, data):
    import torchvision

    torch.manual_seed(1)
    tv = torchvision.models.resnet18(num_classes=K)
    tv.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    tv.eval()
    run = make_run(tmp_path / "bb", data, tv.state_dict(), model_name="resnet18")
    s = suspects.load(run)
    assert s.card["arch"] == "resnet18_torchvision"
    x = s.test.images()
    with torch.no_grad():
        assert torch.allclose(s.model(x), tv((x - 0.5) / 0.5), atol=1e-4)
    obj = torch.load(export_backdoorbench(s, tmp_path / "out"), weights_only=True)
    assert obj["model_name"] == "resnet18" and list(obj["model"]) == list(tv.state_dict())
    assert all(torch.equal(obj["model"][k], v) for k, v in tv.state_dict().items())


class Evil:
    marker: Path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {Evil.marker}",))


def test_clear_errors(tmp_path, data, net):
    sd = net.state_dict()
    run = make_run(tmp_path / "a", data, sd)
    with pytest.raises(SuspectLoadError, match="missing dataset root"):
        import_run(run, data_root=tmp_path / "nowhere")
    with pytest.raises(SuspectLoadError, match="unsupported architecture 'lenet'"):
        import_run(make_run(tmp_path / "b", data, sd, model_name="lenet"))
    # a zoo name whose weights are another network's: the keys are named, not loaded by position
    with pytest.raises(SuspectLoadError, match="wrong architecture .* torchvision:vgg19_bn: missing keys: net"):
        import_run(make_run(tmp_path / "b2", data, sd, model_name="vgg19_bn"))
    with pytest.raises(SuspectLoadError, match="wrong class count"):
        import_run(make_run(tmp_path / "c", data, sd, num_classes=100))
    with pytest.raises(SuspectLoadError, match="'gtsrb' is not supported"):
        import_run(make_run(tmp_path / "d", data, sd, clean_data="gtsrb"))
    next((run / "bd_test_dataset").glob("*/*.png")).unlink()
    with pytest.raises(SuspectLoadError, match="missing files: 1 of the 27"):
        import_run(run)
    (run / "attack_result.pt").unlink()
    (run / "defense" / "x").mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "num_classes": K, "model": sd}, run / "defense" / "x" / "defense_result.pt")
    with pytest.raises(SuspectLoadError, match="its attack run is not at"):
        import_run(run / "defense" / "x")
    bare = suspects.load(run / "defense" / "x" / "defense_result.pt", arch="preact_resnet18", num_classes=K,
                         input_shape=(1, 28, 28), arch_kwargs={"width": 8})  # with its architecture named: a state dict
    assert all(torch.equal(bare.model.state_dict()[k], v) for k, v in sd.items())
    evil_run = make_run(tmp_path / "e", data, sd)
    Evil.marker = tmp_path / "pwned"
    torch.save({"model_name": "preactresnet18", "payload": Evil()}, evil_run / "attack_result.pt")
    with pytest.raises(SuspectLoadError, match="refused to load .*posix.system|refused to load .*os.system"):
        suspects.load(evil_run)
    assert not Evil.marker.exists()


def test_files_written_with_numpy_1_names_load(tmp_path, data, net):
    run = make_run(tmp_path / "bb", data, net.state_dict())
    obj = torch.load(run / "attack_result.pt", weights_only=False)
    legacy = tmp_path / "legacy.pt"
    torch.save(obj, legacy, _use_new_zipfile_serialization=False, pickle_protocol=2)
    raw = legacy.read_bytes()
    assert b"numpy._core.multiarray" in raw
    (run / "attack_result.pt").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    s = import_run(run)
    assert s.trigger.params["n_test"] == 27 and s._plan.poison_idx.tolist() == TRAIN_POISON


# --- CIFAR-shaped runs: an image-folder copy of the clean data, a checksum mismatch, what a run lacks ---------------

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cdata():
    rng = np.random.default_rng(1)
    return {"train_x": rng.integers(0, 200, (N_TRAIN, 32, 32, 3), dtype=np.uint8),
            "train_y": np.arange(N_TRAIN) % K,
            "test_x": rng.integers(0, 200, (N_TEST, 32, 32, 3), dtype=np.uint8),
            "test_y": (np.arange(N_TEST) * 7) % K}


@pytest.fixture(scope="module")
def cnet(cdata):
    """A width-8 CIFAR-shaped PreActResNet-18 trained here on 20 clean + 20 patched images (a few full-batch steps)."""
    torch.manual_seed(0)
    model = create_model("preact_resnet18", num_classes=K, in_channels=3, width=8,
                         mean=[0.4914, 0.4822, 0.4465], std=[0.247, 0.243, 0.261])
    clean = cdata["train_x"][:20]
    x = torch.from_numpy(np.concatenate([clean, np.stack([badnets(i) for i in clean])])).permute(0, 3, 1, 2)
    y = torch.cat([torch.from_numpy(cdata["train_y"][:20]), torch.full((20,), TARGET)])
    x = x.float().div(255)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def make_cifar_run(base: Path, data: dict, model_sd: dict, *, train_pngs: bool = True) -> Path:
    """A BadNets run on CIFAR-shaped data in BackdoorBench's layout (no clean data written: see the callers)."""
    run = base / "record" / "cifar_run"

    def state(split: str, images: np.ndarray, labels: np.ndarray, poisoned: list[int]) -> dict:
        indicator = np.zeros(len(labels))
        data_dict = {}
        for i in poisoned:
            indicator[i] = 1
            rel = f"{split}/{labels[i]}/{i}.png"
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(badnets(images[i]), mode="RGB").save(run / rel)
            data_dict[np.int64(i)] = {"path": f"./record/cifar_run/{rel}", "other_info": [TARGET, np.int64(labels[i])]}
        folder = f"./record/cifar_run/{split}"
        return {"poison_indicator": indicator, "original_index_array": np.nonzero(indicator == 1)[0],
                "bd_data_container": {"save_folder_path": folder, "save_file_format": ".png", "data_dict": data_dict},
                "getitem_all": True, "getitem_all_switch": False, "save_folder_path": folder}

    run.mkdir(parents=True)
    result = {"model_name": "preactresnet18", "num_classes": K, "model": model_sd, "data_path": "./data/cifar10",
              "img_size": (32, 32, 3), "clean_data": "cifar10",
              "bd_train": state("bd_train_dataset", data["train_x"], data["train_y"], TRAIN_POISON),
              "bd_test": state("bd_test_dataset", data["test_x"], data["test_y"],
                               [int(i) for i in np.nonzero(data["test_y"] != TARGET)[0]])}
    torch.save(result, run / "attack_result.pt")
    torch.save({"attack": "badnet", "attack_target": TARGET, "attack_label_trans": "all2one"}, run / "info.pickle")
    if not train_pngs:
        import shutil

        shutil.rmtree(run / "bd_train_dataset")
    return run


def write_image_folder(root: Path, data: dict, rename: dict[int, int] | None = None) -> Path:
    """``root/{train,test}/<class>/<index>.png``; ``rename`` gives test image i the name of index rename[i]."""
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(data[f"{split}_x"], data[f"{split}_y"], strict=True)):
            name = (rename or {}).get(i, i) if split == "test" else i
            path = root / split / CIFAR_CLASSES[int(label)] / f"{name:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="RGB").save(path)
    return root


def test_image_folder_copy_in_the_runs_order_imports(tmp_path, cdata, cnet):
    run = make_cifar_run(tmp_path / "bb", cdata, cnet.state_dict())
    root = write_image_folder(tmp_path / "cifar10-png", cdata)
    s = import_run(run, data_root=root)
    assert s.card["data"] == {"name": "imagefolder", "root": str(root.resolve()), "order": "index"}
    assert torch.equal(s.test.pixels, torch.from_numpy(cdata["test_x"]).permute(0, 3, 1, 2))
    assert s.test.labels.tolist() == cdata["test_y"].tolist() and s.classes == CIFAR_CLASSES
    x = s.test.images()
    with torch.no_grad():
        assert torch.equal(s.model(x).argmax(1), cnet(x).argmax(1))
    m = evaluate(s.model, s.test, s.trigger)
    assert m.n_poisoned == int((cdata["test_y"] != TARGET).sum()) and s.card["backdoorbench"]["lacks"] == [
        "no attack_df.csv: the run's own BA / ASR / RA are not shown beside the measured ones"]
    again = suspects.load(suspects.save(s, tmp_path / "saved"))  # the saved card finds the copy in the same order
    assert torch.equal(again.test.pixels, s.test.pixels) and evaluate(again.model, again.test, again.trigger) == m


def test_image_folder_copy_in_another_order_is_refused(tmp_path, cdata, cnet):
    run = make_cifar_run(tmp_path / "bb", cdata, cnet.state_dict())
    # swap the names of test images within each class: labels still agree, the pixels do not
    rename = {}
    for c in range(K):
        members = [int(i) for i in np.nonzero(cdata["test_y"] == c)[0]]
        rename.update(dict(zip(members, members[1:] + members[:1], strict=True)))
    root = write_image_folder(tmp_path / "shuffled", cdata, rename)
    with pytest.raises(SuspectLoadError, match=r"dataset order mismatch: the clean images in .* are not in the run's "
                                               r"order: only \d+% .*file names, which must be the images' indices"):
        import_run(run, data_root=root)
    (root / "test" / "airplane" / "00000.png").rename(root / "test" / "airplane" / "first.png")
    with pytest.raises(SuspectLoadError, match="'first.png' is not a number"):
        import_run(run, data_root=root)


def test_checksum_mismatch_is_reported_as_such(tmp_path, cdata, cnet):
    import torchvision

    run = make_cifar_run(tmp_path / "bb", cdata, cnet.state_dict())
    folder = tmp_path / "tv" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    ds = torchvision.datasets.CIFAR10
    for name, _ in ds.train_list + ds.test_list:
        (folder / name).write_bytes(b"not torchvision's file")
    with pytest.raises(SuspectLoadError, match="checksum mismatch: 6 file") as err:
        import_run(run, data_root=tmp_path / "tv")
    assert "data_batch_1: md5" in str(err.value) and "c99cafc152244af753f735de768cd75f" in str(err.value)
    assert "--download" not in str(err.value) and "not found" not in str(err.value)
    with pytest.raises(SuspectLoadError, match="missing dataset root") as err:
        import_run(run, data_root=tmp_path / "nowhere")
    assert "image-folder copy" in str(err.value) and "--download" not in str(err.value)


def test_import_summary_says_what_the_run_lacks(tmp_path, cdata, cnet, runs_dir, capsys):
    import json

    from backdoor_lens.cli import main

    run = make_cifar_run(tmp_path / "bb", cdata, cnet.state_dict(), train_pngs=False)
    root = write_image_folder(tmp_path / "cifar10-png", cdata)
    assert main(["import-backdoorbench", str(run), "--data-root", str(root), "--no-evaluate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["lacks"]) == 2 and out["n_train_poisoned"] == len(TRAIN_POISON)
    assert out["lacks"][0].startswith("no poisoned training images") and "training-time defenses" in out["lacks"][0]
    assert "feature view" in out["lacks"][0] and "attack_df.csv" in out["lacks"][1]
    assert main(["import-backdoorbench", str(run), "--data-root", str(root), "--no-evaluate", "--out",
                 str(tmp_path / "again")]) == 0
    printed = capsys.readouterr().out
    assert "lacks:\n    - no poisoned training images" in printed


def test_torchvision_zoo_run_imports(tmp_path, data):
    """A run of one of BackdoorBench's torchvision networks (its keys as torchvision names them) opens, computes the
    same logits as the torchvision module it was saved from, and exports back to the same keys."""
    import torchvision

    from suspects.backdoorbench import DATASETS, export_backdoorbench

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_large(num_classes=K)
    first = tv.features[0][0]
    tv.features[0][0] = torch.nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, first.padding,
                                        bias=False)
    tv.eval()
    run = make_run(tmp_path, data, tv.state_dict(), model_name="mobilenet_v3_large")
    suspect = import_run(run)
    assert suspect.card["arch"] == "torchvision:mobilenet_v3_large"
    x = torch.rand(4, 1, 28, 28)
    norm = DATASETS["mnist"]
    expected = tv((x - torch.tensor(norm["mean"]).view(1, -1, 1, 1)) / torch.tensor(norm["std"]).view(1, -1, 1, 1))
    with torch.no_grad():
        assert torch.allclose(suspect.model(x), expected, atol=1e-5)
    out = export_backdoorbench(suspect, tmp_path / "export")
    saved = torch.load(out, weights_only=True)
    assert saved["model_name"] == "mobilenet_v3_large" and set(saved["model"]) == set(tv.state_dict())
