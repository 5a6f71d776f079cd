import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import suspects
from suspects.models import create_model, set_skip_gamma
from suspects.store import Suspect, SuspectLoadError, load, save

CARD = {"name": "tiny", "arch": "preact_resnet18", "arch_kwargs": {"width": 4}, "classes": [str(i) for i in range(10)],
        "input_shape": [1, 28, 28], "data": {"name": "demo"},
        "trigger": {"name": "badnets", "target": 0, "mapping": "all-to-one", "params": {}}}


def tiny_model(num_classes=10):
    torch.manual_seed(0)
    return create_model("preact_resnet18", num_classes=num_classes, in_channels=1, width=4).eval()


def test_round_trip_keeps_weights_card_and_gammas(tmp_path):
    model = tiny_model()
    set_skip_gamma(model, "layer2.0", 0.25)
    folder = save(Suspect(model, dict(CARD)), tmp_path / "s")
    assert (folder / "model.safetensors").is_file() and (folder / "suspect.json").is_file()
    loaded = load(folder)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.card["skip_gammas"] == {"layer2.0": 0.25}
    assert loaded.trigger.name == "badnets" and loaded.num_classes == 10
    assert "torch" in loaded.card["versions"]
    assert not list(tmp_path.glob(".*partial"))
    with pytest.raises(FileExistsError):
        save(Suspect(model, dict(CARD)), folder)


def test_bare_state_dicts_safetensors_and_pt(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "m.pt")
    x = torch.rand(2, 1, 28, 28)
    for f in ("m.safetensors", "m.pt"):
        s = load(tmp_path / f, arch="preact_resnet18", num_classes=10, input_shape=(1, 28, 28),
                 arch_kwargs={"width": 4}, normalize="0.5/0.5")
        with torch.no_grad():
            assert torch.equal(s.model(x), model(x))
        assert s.card["normalization"]["assumed"] is False
    # no normalisation named: none is assumed, and the card says so (never a silent default)
    s = load(tmp_path / "m.pt", arch="preact_resnet18", num_classes=10, input_shape=(1, 28, 28))
    assert s.card["normalization"]["assumed"] is True and s.card["normalization"]["mean"] == [0.0]
    assert "assumed" in s.card["normalization"]["label"]
    # with a data source, its standard normalisation and input shape are assumed
    s = load(tmp_path / "m.pt", arch="preact_resnet18", data="demo")
    assert s.input_shape == (1, 28, 28) and s.card["normalization"]["label"].startswith("demo")
    with pytest.raises(SuspectLoadError, match="name its architecture"):
        load(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="3 means"):
        load(tmp_path / "m.pt", arch="preact_resnet18", data="demo", normalize="0.4,0.4,0.4/0.2,0.2,0.2")


class Boom:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {Boom.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    Boom.marker = marker
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"linear.weight": Boom()}, fh)
    # torch.save format too
    torch.save({"payload": Boom()}, tmp_path / "evil2.pt")
    for f in (bad, tmp_path / "evil2.pt"):
        with pytest.raises(SuspectLoadError, match="refused"):
            load(f, arch="preact_resnet18", num_classes=10)
    assert not marker.exists()
    with open(bad, "rb") as fh:  # the payload is real: an unsafe load would have run it
        pickle.load(fh)
    assert marker.exists()


def test_mismatched_keys_are_named(tmp_path):
    sd = tiny_model().state_dict()
    sd["extra.weight"] = torch.zeros(3)
    del sd["layer3.0.conv1.weight"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(SuspectLoadError) as err:
        load(tmp_path / "m.pth", arch="preact_resnet18", num_classes=10, input_shape=(1, 28, 28),
             arch_kwargs={"width": 4})
    assert "layer3.0.conv1.weight" in str(err.value) and "extra.weight" in str(err.value)


def test_wrong_class_count_is_explained(tmp_path):
    torch.save(tiny_model(num_classes=43).state_dict(), tmp_path / "gtsrb.pt")
    with pytest.raises(SuspectLoadError, match="checkpoint has 43 classes, the model was built for 10"):
        load(tmp_path / "gtsrb.pt", arch="preact_resnet18", num_classes=10, input_shape=(1, 28, 28),
             arch_kwargs={"width": 4})


def test_corrupted_folder_and_files(tmp_path):
    folder = save(Suspect(tiny_model(), dict(CARD)), tmp_path / "s")
    (folder / "suspect.json").write_text("{not json")
    with pytest.raises(SuspectLoadError, match="not valid JSON"):
        load(folder)
    (folder / "suspect.json").write_text(json.dumps(CARD))
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(SuspectLoadError, match="safetensors"):
        load(folder)
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01junk")
    with pytest.raises(SuspectLoadError):
        load(tmp_path / "junk.pt", arch="preact_resnet18", num_classes=10)
    with pytest.raises(SuspectLoadError, match="unsupported file type"):
        load(tmp_path / "s" / "suspect.json")
    with pytest.raises(SuspectLoadError, match="no demo suspect"):
        load("demo:does-not-exist")


def test_public_api_exports():
    assert callable(suspects.load) and callable(suspects.evaluate) and callable(suspects.create_model)
