"""Issue 12 item 2: one safe checkpoint loader whose errors name the user's file in one line; atomic writes;
BackdoorBench's loader registered without importing its module."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import suspects
from suspects.atomic import atomic_folder, replacing, save_safetensors, write_bytes, write_json, write_text
from suspects.checkpoint import CheckpointError, load_checkpoint, load_state_dict_file, sniff_format
from suspects.models import create_model
from suspects.store import SuspectLoadError

ROOT = Path(__file__).resolve().parent.parent
ARCH = {"arch": "preact_resnet18", "num_classes": 10, "input_shape": (1, 28, 28), "arch_kwargs": {"width": 4}}


def tiny_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("preact_resnet18", num_classes=10, in_channels=1, width=4).state_dict()


class Payload:
    """Pickles to ``os.system("touch <marker>")``: an unsafe loader would create the marker."""

    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


@pytest.fixture
def files(tmp_path):
    """A good checkpoint in each format and the broken files the errors are about."""
    sd = tiny_state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "good.safetensors"))
    torch.save(sd, tmp_path / "good.pt")
    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "notes.pt").write_text("these are my notes, not a model\n")
    Payload.marker = tmp_path / "pwned"
    torch.save({"linear.weight": Payload()}, tmp_path / "evil.pt")
    with open(tmp_path / "evil-pickle.pt", "wb") as fh:
        pickle.dump({"linear.weight": Payload()}, fh)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    return tmp_path


def test_good_files_load_in_both_formats(files):
    a = load_state_dict_file(files / "good.safetensors")
    b = load_state_dict_file(files / "good.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sniff_format(files / "good.safetensors") == "safetensors"
    assert sniff_format(files / "good.pt") == "torch-zip"
    # the format is read off the bytes, not the name: a safetensors file called .pt loads too
    (files / "renamed.pt").write_bytes((files / "good.safetensors").read_bytes())
    assert load_checkpoint(files / "renamed.pt").keys() == a.keys()


def test_a_text_file_renamed_to_pt_is_not_a_checkpoint(files):
    with pytest.raises(CheckpointError) as err:
        suspects.load(files / "notes.pt", **ARCH)
    e = err.value
    assert e.kind == "not-a-checkpoint" and isinstance(e, SuspectLoadError) and isinstance(e, ValueError)
    assert e.summary == f"{files / 'notes.pt'}: not a checkpoint (neither safetensors nor a torch file)"
    assert "KeyError" not in str(e) and "101" not in str(e)


def test_truncated_files_name_the_users_file(files):
    with pytest.raises(CheckpointError) as err:
        suspects.load(files / "cut.safetensors", label="my-model.safetensors", **ARCH)
    e = err.value
    assert e.kind == "truncated" and e.summary.startswith("my-model.safetensors: truncated or corrupted")
    assert str(files) not in e.summary and "\n" not in e.summary
    assert e.details  # the underlying error, for an expander
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated or corrupted") as err:
        load_checkpoint(files / "cut.pt")
    assert err.value.kind == "truncated"


def test_a_malicious_pickle_is_refused_in_one_line_and_never_runs(files):
    for name in ("evil.pt", "evil-pickle.pt"):
        with pytest.raises(CheckpointError) as err:
            suspects.load(files / name, **ARCH)
        e = err.value
        assert e.kind == "refused" and e.refused_global in ("posix.system", "os.system", "nt.system")
        again = pickle.loads(pickle.dumps(e))  # survives a trip back from a worker process
        assert (again.summary, again.details, again.kind, again.file) == (e.summary, e.details, e.kind, e.file)
        assert e.summary == f"refused to load {files / name}: it asks to run code ({e.refused_global})"
        assert "\n" not in str(e)
        # the details say in plain words what it asked for, never a bare "Unsupported operand 149" (issue 27.8)
        assert f"asks for the Python global {e.refused_global}" in e.details and "Unsupported operand" not in e.details
        for text in (str(e), e.details):
            assert "weights_only=False" not in text and "weights_only` set to `False" not in text
    assert not Payload.marker.exists()
    with open(files / "evil-pickle.pt", "rb") as fh:  # the payload is real: an unsafe load runs it
        pickle.load(fh)
    assert Payload.marker.exists()


def test_wrong_contents_and_wrong_architecture(files):
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_state_dict_file(files / "list.pt")
    assert load_checkpoint(files / "list.pt") == [1, 2, 3]  # any safe object, for BackdoorBench's files
    with pytest.raises(CheckpointError) as err:
        suspects.load(files / "good.pt", **{**ARCH, "num_classes": 43})
    e = err.value
    assert e.kind == "mismatch" and "wrong architecture / class count" in e.summary
    assert "the checkpoint has 10 classes, the model was built for 43" in e.summary
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(files / "missing.pt", name="missing.pt")


def test_width_channels_and_classes_are_read_off_the_weights(files):
    """Issue 12 item 3: a bare state dict needs no width (nor class count / channels); a mismatch names what
    differs instead of "10 classes, built for 10"."""
    s = suspects.load(files / "good.safetensors", arch="preact_resnet18")
    assert s.card["arch_kwargs"] == {"width": 4} and s.num_classes == 10 and s.input_shape == (1, 32, 32)
    with pytest.raises(CheckpointError) as err:
        suspects.load(files / "good.pt", **{**ARCH, "arch_kwargs": {"width": 64}})
    assert "width: the checkpoint's first convolution has 4 channels, the model was built with 64" in err.value.summary
    assert "class count:" not in err.value.summary and "conv1.weight (4, 1, 3, 3)" in err.value.details
    with pytest.raises(CheckpointError, match="input channels: the checkpoint takes 1, the model was built for 3"):
        suspects.load(files / "good.pt", **{**ARCH, "input_shape": (3, 32, 32)})


def test_cli_errors_are_one_line_with_exit_code_2(files):
    def cli(*args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-m", "backdoor_lens.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=files, env=env)

    arch = ["--arch", "preact_resnet18", "--num-classes", "10", "--input-shape", "1", "28", "28",
            "--arch-arg", "width=4"]
    r = cli("evaluate", "notes.pt", *arch)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("backdoor-lens evaluate: error: notes.pt: not a checkpoint (neither safetensors nor a "
                        "torch file)\n")
    r = cli("evaluate", "evil.pt", *arch)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "refused to load evil.pt: it asks to run code (" in r.stderr and "weights_only" not in r.stderr
    r = cli("evaluate", "cut.safetensors", *arch)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "error: cut.safetensors: truncated or corrupted" in r.stderr and "--verbose" in r.stderr
    r = cli("evaluate", "cut.safetensors", *arch, "--verbose")  # the details follow the summary line
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) >= 2 and "truncated or corrupted" in lines[0]
    assert "Error" in "\n".join(lines[1:])
    assert not Payload.marker.exists()
    r = cli("evaluate", "good.pt", *arch[:-1], "width=16")  # a wrong width: named, exit code 2
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "width: the checkpoint's first convolution has 4 channels, the model was built with 16" in r.stderr


# --- atomic writes ------------------------------------------------------------------------------------------


def test_atomic_files_replace_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "report.json"
    write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json(target, {"a": object()})  # cannot be serialised: the old file stays
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    save_safetensors(tmp_path / "w.safetensors", {"x": torch.arange(3.0)}, {"kind": 1})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["x"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.rglob("*") if ".partial" in p.name) == []


def test_atomic_folder_appears_only_when_complete(tmp_path):
    dest = tmp_path / "suspect"
    with pytest.raises(OSError), atomic_folder(dest) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        raise OSError("disk full")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_folder(dest) as tmp:
        (tmp / "a").write_text("1")
    assert (dest / "a").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_folder(dest):
            pass
    with pytest.raises(OSError), atomic_folder(dest, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
        raise OSError("crash")
    assert [p.name for p in dest.iterdir()] == ["a"]  # the old folder is untouched
    with atomic_folder(dest, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in dest.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["suspect"]


# --- BackdoorBench's loader is registered without importing its module --------------------------------------


def test_importing_suspects_does_not_import_backdoorbench():
    code = (
        "import sys\n"
        "import suspects.device\n"
        "import suspects\n"
        "assert 'suspects.backdoorbench' not in sys.modules, 'imported by suspects'\n"
        "assert 'resnet18_torchvision' in suspects.list_models()\n"
        "s = suspects.load(suspects.store.demo_suspect_path('clean'))\n"  # loading a folder tries the loaders ...
        "assert 'suspects.backdoorbench' in sys.modules\n"  # ... importing BackdoorBench's on first use
        "assert callable(suspects.import_run) and callable(suspects.export_backdoorbench)\n"
        "from suspects.store import _LOADERS\n"
        "assert all(callable(f) for f in _LOADERS) and len(_LOADERS) == 1\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
