"""Issue 11: the ``runs`` package (one ``runs_root()``, uploads), the import layering, and the per-command CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import suspects
from runs import store as run_store
from runs.store import RunStore, runs_root
from runs.uploads import card_name, read_card, save_upload, stored_suspects, upload_folder
from suspects.checkpoint import CheckpointError
from suspects.models import create_model

ROOT = Path(__file__).resolve().parent.parent


def test_importing_defenses_does_not_load_runs():
    """The one-way rule at run time (tests/test_layering.py checks the source)."""
    code = "import sys, defenses, analysis.reverse; assert not any(m == 'runs' or m.startswith('runs.') for m in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr


# --- one runs_root() --------------------------------------------------------------------------------------------


def test_runs_root_default_override_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("BACKDOOR_LENS_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert runs_root() == (tmp_path / "lens-runs").resolve()
    assert RunStore().root == (tmp_path / "lens-runs").resolve() and (tmp_path / "lens-runs" / "index.sqlite").is_file()
    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path / "env"))
    assert runs_root() == (tmp_path / "env").resolve()
    assert runs_root(tmp_path / "flag") == (tmp_path / "flag").resolve()  # --runs wins over the environment


def test_a_legacy_store_at_runs_keeps_working_and_the_user_is_told_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BACKDOOR_LENS_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_store, "_told_legacy", set())
    old = RunStore(tmp_path / "runs")
    rid = old.create("finetune", "demo:badnets", "quick", {}, 100, 0)
    assert runs_root() == (tmp_path / "runs").resolve()
    assert RunStore().get(rid) is not None  # the old runs are still there
    err = capsys.readouterr().err
    assert err.count("lens-runs") == 1 and "BACKDOOR_LENS_RUNS" in err
    runs_root()
    assert capsys.readouterr().err == ""  # once
    (tmp_path / "lens-runs").mkdir()
    assert runs_root() == (tmp_path / "lens-runs").resolve()  # once the new folder exists it is the store


# --- uploads ------------------------------------------------------------------------------------------------


def _state_dict_bytes(tmp_path: Path) -> bytes:
    torch.manual_seed(0)
    sd = create_model("preact_resnet18", num_classes=10, in_channels=1, width=4).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    return (tmp_path / "w.safetensors").read_bytes()


def test_an_upload_is_saved_as_a_suspect_and_listed(tmp_path):
    raw = _state_dict_bytes(tmp_path)
    root = tmp_path / "store"
    folder, suspect = save_upload(raw, "my model.safetensors", "preact_resnet18", "demo", {"width": 4}, root=root)
    assert folder == upload_folder(raw, "my model.safetensors", root) and folder.parent == root.resolve() / "uploads"
    assert suspect.card["provenance"]["file"] == "my model.safetensors" and suspect.num_classes == 10
    again = suspects.load(folder)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again.model(x), suspect.model(x))
    assert stored_suspects(root) == [str(folder)]
    assert read_card(folder)["name"] == "my model" and card_name(folder) == "my model"
    assert read_card(tmp_path) is None and card_name(tmp_path / "nowhere", "fallback") == "fallback"


def test_a_broken_upload_is_named_by_the_users_filename(tmp_path):
    raw = _state_dict_bytes(tmp_path)
    with pytest.raises(CheckpointError) as err:
        save_upload(raw[: len(raw) // 2], "my-model.safetensors", "preact_resnet18", "demo", {"width": 4},
                    root=tmp_path / "store")
    e = err.value
    assert e.summary == "my-model.safetensors: truncated or corrupted (safetensors file)"
    assert "backdoor-lens-upload" not in e.summary and "upload.safetensors" not in e.summary
    assert not (tmp_path / "store" / "uploads").exists()
    with pytest.raises(CheckpointError, match=r"^notes\.pt: not a checkpoint"):
        save_upload(b"plain text, renamed\n", "notes.pt", "preact_resnet18", "demo", {"width": 4},
                    root=tmp_path / "store")
    with pytest.raises(suspects.DatasetNotFoundError, match="data source 'no-such-source'"):
        save_upload(raw, "m.safetensors", "preact_resnet18", "no-such-source", root=tmp_path / "store")


# --- the command line: one module per subcommand ------------------------------------------------------------


def test_every_command_module_registers_its_subcommand():
    from backdoor_lens.cli import build_parser, list_commands

    mods = list_commands()
    names = {m.__name__.rsplit(".", 1)[1].replace("_", "-") for m in mods}
    files = {p.stem.replace("_", "-") for p in (ROOT / "backdoor_lens" / "commands").glob("[!_]*.py")}
    assert names == files and {"serve", "defend", "detect", "import-backdoorbench"} <= names
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices)[:3] == ["serve", "train", "evaluate"] and set(sub.choices) == names
    for name, parser in sub.choices.items():
        mod = next(m for m in mods if m.__name__.endswith("." + name.replace("-", "_")))
        assert parser.get_default("func") is mod.run


def test_the_worker_module_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runs.worker", "--runs", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr  # an empty queue: it exits at once
    assert (tmp_path / "index.sqlite").is_file()
