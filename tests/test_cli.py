import json
import subprocess
import sys

import pytest

from backdoor_lens.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "backdoor_lens.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("sub", ["serve", "train", "evaluate", "models", "attacks", "demo"])
def test_every_subcommand_has_help(sub):
    r = run_cli(sub, "--help")
    assert r.returncode == 0 and "usage: backdoor-lens " + sub in r.stdout


def test_evaluate_json(capsys):
    assert main(["evaluate", "demo:badnets", "--json", "--limit", "400"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("ba", "asr", "ra"):
        assert 0.0 <= out[key] <= 1.0
    assert out["n_clean"] == 400 and 0 < out["n_poisoned"] < 400
    assert out["asr"] > 0.9


def test_evaluate_with_another_trigger_and_human_output(capsys):
    assert main(["evaluate", "demo:clean", "--attack", "badnets", "--limit", "300"]) == 0
    text = capsys.readouterr().out
    assert "BA" in text and "benign accuracy" in text and "ASR" in text


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--arch", "resnet18", "--num-classes", "10"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(tmp_path / "w.pt")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["train", "--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err


def test_train_command_writes_a_suspect(tmp_path):
    out = tmp_path / "s"
    r = run_cli("train", "--data", "demo", "--attack", "blended", "--attack-param", "alpha=0.3", "--width", "4",
                "--max-steps", "3", "--epochs", "1", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    card = json.loads((out / "suspect.json").read_text())
    assert card["trigger"]["params"]["alpha"] == 0.3 and card["arch_kwargs"]["width"] == 4
    assert json.loads(r.stdout)["suspect"] == str(out.resolve())


def test_defenses_listing(capsys):
    assert main(["defenses", "--params"]) == 0
    out = capsys.readouterr().out
    for name in ("shortcut", "linf_prune", "awm", "anp", "fineprune", "finetune"):
        assert name in out
    assert "threat model" in out and "alpha" in out


def test_defend_json_stores_the_run(tmp_path):
    r = run_cli("defend", "linf_prune", "demo:badnets", "--set", "max_ratio=0.05", "--pool-size", "100",
                "--runs", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    for key in ("ba_before", "asr_before", "ba", "asr", "ra", "der", "seconds", "device", "run_dir"):
        assert key in report
    assert report["asr"] < report["asr_before"]
    from pathlib import Path

    assert (Path(report["run_dir"]) / "model.safetensors").is_file()


def test_defend_refuses_nonsense(tmp_path, capsys):
    assert main(["defend", "anp", "demo:badnets", "--set", "eps=-1", "--runs", str(tmp_path)]) == 2
    assert "'eps' must lie in" in capsys.readouterr().err
    assert not list(tmp_path.glob("2*"))


def test_defend_refuses_a_bad_pool_size_before_recording_a_run(tmp_path, capsys):
    from runs.store import RunStore

    assert main(["defend", "finetune", "demo:badnets", "--pool-size", "0", "--runs", str(tmp_path)]) == 2
    assert "pool size must lie in" in capsys.readouterr().err
    assert RunStore(tmp_path).list() == []
