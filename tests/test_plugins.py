"""Plugins (issue 32): installed packages add defenses and attacks through entry points, next to the built-ins.

An example plugin package (one defense, one attack) and a broken one are put on ``sys.path`` with their
``.dist-info`` folders, which is what ``pip install`` leaves behind; every registry is then read afresh and restored
after each test, so no other test sees them. The scaffold test really runs ``pip install -e`` (into a temporary
prefix, so the shared environment never sees the package).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backdoor_lens.cli import main

ROOT = Path(__file__).resolve().parent.parent

DEFENSE = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defenses.base import Defense, DefenseOutput, ThreatModel, param


@dataclass
class LensExampleParams:
    steps: int = param(30, help="SGD steps on the clean pool", min=1, max=1000, integer=True)
    lr: float = param(0.01, help="learning rate", min=1e-5, max=1.0)


class LensExampleDefense(Defense):
    name = "lens_example"
    title = "Lens example defense"
    paper = "a plugin (tests/test_plugins.py)"
    summary = "A few SGD steps on the clean pool, from an installed package."
    threat = ThreatModel(clean_pool=True)
    Params = LensExampleParams
    presets = {"quick": {"steps": 3}, "paper": {}}

    def repair(self, model, params, ctx):
        opt = torch.optim.SGD(model.parameters(), lr=params.lr)
        model.train()
        losses = []
        for step in range(params.steps):
            loss = F.cross_entropy(model(ctx.pool.x[:16].to(ctx.device)), ctx.pool.y[:16].to(ctx.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            ctx.tick((step + 1) / params.steps, f"step {step + 1}", {"loss": losses[-1]})
        model.eval()
        return DefenseOutput(model, curves={"loss": losses})
'''

ATTACK = '''
from suspects.triggers import Trigger


class LensFrame(Trigger):
    name = "lens_frame"
    description = "a bright frame around the image (a plugin)"
    defaults = {"width": 1}

    def apply(self, x):
        k = int(self.params["width"])
        out = x.clone()
        out[..., :k, :] = 1.0
        out[..., -k:, :] = 1.0
        out[..., :, :k] = 1.0
        out[..., :, -k:] = 1.0
        return out
'''

BROKEN = '''
from defenses.base import Defense, ThreatModel
from defenses.registry import register_defense
from defenses.finetune import FineTune
from suspects.triggers import Trigger


class Clash(FineTune):
    """Claims a built-in's name."""


class NoRepair(Defense):
    name = "lens_no_repair"
    title = "Forgot repair"
    threat = ThreatModel()


class NoApply(Trigger):
    name = "lens_no_apply"
'''

HALF = '''
from defenses.finetune import FineTune
from defenses.registry import register_defense


@register_defense
class Registered(FineTune):
    name = "lens_half_registered"


raise RuntimeError("the module fails after registering a defense")
'''


def _dist(root: Path, dist: str, package: str, modules: dict[str, str], entry_points: str) -> None:
    (root / package).mkdir()
    (root / package / "__init__.py").write_text("")
    for name, text in modules.items():
        (root / package / f"{name}.py").write_text(text)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture(scope="module")
def plugin_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    _dist(root, "lens_example_plugin", "lens_example_plugin", {"defense": DEFENSE, "attack": ATTACK}, """
        [backdoor_lens.defenses]
        lens_example = lens_example_plugin.defense:LensExampleDefense

        [backdoor_lens.attacks]
        lens_frame = lens_example_plugin.attack:LensFrame
        """)
    _dist(root, "lens_broken_plugin", "lens_broken_plugin", {"things": BROKEN, "half": HALF}, """
        [backdoor_lens.defenses]
        missing = lens_broken_plugin.not_there:Nothing
        clash = lens_broken_plugin.things:Clash
        no_repair = lens_broken_plugin.things:NoRepair
        half = lens_broken_plugin.half

        [backdoor_lens.attacks]
        no_apply = lens_broken_plugin.things:NoApply
        """)
    return root


@pytest.fixture
def plugins(plugin_root, monkeypatch):
    """The example plugins on the path (this process and its subprocesses), every registry read afresh."""
    import analysis.screening
    import defenses.registry
    import suspects.models
    import suspects.plugins
    import suspects.triggers

    monkeypatch.syspath_prepend(str(plugin_root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugin_root), os.environ.get("PYTHONPATH", "")]))
    for mod in (defenses.registry, suspects.triggers, suspects.models, analysis.screening):
        monkeypatch.setattr(mod, "_REGISTRY", dict(mod._REGISTRY))
    monkeypatch.setattr(defenses.registry, "_loaded", False)
    monkeypatch.setattr(suspects.plugins, "_RECORDS", {})
    yield plugin_root
    for name in [m for m in sys.modules if m.startswith(("lens_example_plugin", "lens_broken_plugin"))]:
        del sys.modules[name]


def _declared(pyproject: Path, group: str) -> dict[str, str]:
    """The entry points a pyproject.toml declares for ``group`` (a small reader: tomllib needs Python 3.11)."""
    section = pyproject.read_text().split(f'[project.entry-points."{group}"]', 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]+)"', section, re.MULTILINE))


def test_the_builtins_come_through_the_same_entry_points():
    from defenses.registry import defense_modules
    from suspects.plugins import plugin_records

    assert sorted(_declared(ROOT / "pyproject.toml", "backdoor_lens.defenses").values()) == defense_modules()
    assert main(["plugins", "--all", "--json"]) == 0
    records = plugin_records()
    assert {r.kind for r in records} == {"defenses", "attacks", "architectures", "screeners"}
    assert all(r.status == "loaded" and r.builtin for r in records)
    from analysis.screening import list_screeners
    from defenses.registry import list_defenses
    from suspects.triggers import list_triggers

    def provided(kind: str) -> list[str]:
        return sorted(p for r in records if r.kind == kind for p in r.provides)

    assert provided("defenses") == sorted(list_defenses())  # every built-in is one of the entry points
    assert provided("attacks") == sorted(list_triggers(include_recovered=True))
    assert provided("screeners") == sorted(list_screeners())


def test_an_install_without_the_entry_points_still_finds_the_builtins(monkeypatch):
    """An old ``pip install -e .`` (metadata without entry points): the registries fall back on their modules."""
    import defenses.registry
    import suspects.plugins

    monkeypatch.setattr(defenses.registry, "_REGISTRY", dict(defenses.registry._REGISTRY))
    monkeypatch.setattr(defenses.registry, "_loaded", False)
    monkeypatch.setattr(suspects.plugins, "_RECORDS", {})
    monkeypatch.setattr(suspects.plugins, "_entry_points", lambda group: [])
    names = defenses.registry.list_defenses()
    records = suspects.plugins.plugin_records(["defenses"])
    assert [r.value for r in records] == defenses.registry.defense_modules()
    assert all(r.status == "loaded" and "pip install -e" in r.dist for r in records)
    assert sorted(p for r in records for p in r.provides) == sorted(names)


def test_a_plugin_defense_and_attack_sit_next_to_the_builtins(plugins, capsys, caplog):
    from defenses.registry import get_defense, list_defenses
    from suspects.triggers import list_triggers

    with caplog.at_level(logging.WARNING, logger="backdoor_lens.plugins"):
        assert main(["defenses", "--params"]) == 0
        out = capsys.readouterr().out
        assert "lens_example" in out and "Lens example defense" in out and "steps = 30" in out
        assert main(["attacks"]) == 0
        assert "lens_frame" in capsys.readouterr().out
        assert main(["plugins", "--json"]) == 0
        records = {(r["kind"], r["name"]): r for r in json.loads(capsys.readouterr().out)}
        list_defenses(), list_triggers()  # asking again reports nothing new
    assert records[("defenses", "lens_example")]["provides"] == ["lens_example"]
    assert records[("attacks", "lens_frame")]["status"] == "loaded"
    # every broken plugin is refused by name with its reason, and reported once
    reasons = {name: r["reason"] for (_, name), r in records.items() if r["status"] == "refused"}
    assert set(reasons) == {"missing", "clash", "no_repair", "half", "no_apply"}
    assert "import failed" in reasons["missing"] and "lens_broken_plugin.not_there" in reasons["missing"]
    assert "'finetune' is already taken by defenses.finetune.FineTune" in reasons["clash"]
    assert "does not implement repair" in reasons["no_repair"]
    assert "RuntimeError" in reasons["half"]
    assert "does not implement apply" in reasons["no_apply"]
    warned = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warned) == 5 and all(any(f"'{n}'" in w for w in warned) for n in reasons)
    # the built-ins are untouched and nothing a refused plugin registered is left behind
    assert type(get_defense("finetune")).__module__ == "defenses.finetune"
    assert {"lens_half_registered", "lens_no_repair"}.isdisjoint(list_defenses())
    assert "lens_no_apply" not in list_triggers(include_recovered=True)
    assert main(["plugins"]) == 0
    assert "REFUSED: defense name 'finetune' is already taken" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread")
def test_a_plugin_defense_runs_through_defend(plugins, tmp_path, capsys):
    assert main(["defend", "lens_example", "demo:badnets", "--pool-size", "60", "--measure", "subset:100",
                 "--runs", str(tmp_path), "--json", "--quiet", "--no-estimate"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["defense"] == "lens_example" and len(report["curves"]["loss"]) == 3
    assert (Path(report["run_dir"]) / "model.safetensors").is_file()
    from runs.store import RunStore

    (rec,) = RunStore(tmp_path).list()
    assert rec.defense == "lens_example"
    # Compare lists it, and the stress test (the retuning attack) runs on its repaired model
    assert main(["compare", "demo:badnets", "--runs", str(tmp_path), "--json"]) == 0
    assert "lens_example" in capsys.readouterr().out
    stress = ["stress", rec.id, "--json", "--quiet", "--runs", str(tmp_path), "--reference", "none"]
    for k, v in {"epochs": 1, "pool_size": 100, "test_limit": 200, "batch_size": 64, "seeds": 1}.items():
        stress += ["--set", f"{k}={v}"]
    assert main(stress) == 0
    assert "asr_after_retune" in json.loads(capsys.readouterr().out)


@pytest.mark.usefixtures("one_thread")
def test_a_plugin_attack_trains_a_tiny_suspect(plugins, tmp_path):
    import suspects

    out = tmp_path / "framed"
    assert main(["train", "--data", "demo", "--attack", "lens_frame", "--attack-param", "width=2", "--width", "4",
                 "--max-steps", "3", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    suspect = suspects.load(str(out))
    assert suspect.card["trigger"]["name"] == "lens_frame" and type(suspect.trigger).__name__ == "LensFrame"
    x = suspect.test.images(slice(0, 4))
    assert (suspect.trigger(x)[..., :2, :] == 1.0).all() and not (x[..., :2, :] == 1.0).all()
    assert 0.0 <= suspect.card["metrics"]["asr"] <= 1.0  # measured with the plugin's trigger


def test_a_plugin_defense_gets_its_card_on_the_defenses_page(plugins, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("BACKDOOR_LENS_RUNS", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.query_params["suspect"] = "demo:badnets"
    at.session_state["sample_size"] = 100
    at.run()
    at.switch_page("views/defenses.py").run()
    assert not at.exception, at.exception
    assert "Lens example defense" in [s.value for s in at.subheader]
    assert at.number_input(key="p_lens_example_quick_steps").value == 3  # the widget from its Params and preset
    warnings = " ".join(w.value for w in at.warning)
    assert "clash" in warnings and "already taken" in warnings and "half" in warnings
    # Run: the background worker (another process, which finds the plugin through its entry point) repairs the
    # model, and the card shows the result from the run store
    at.number_input(key="p_lens_example_quick_steps").set_value(2)
    at.button(key="run_lens_example").click().run()
    assert not at.exception, at.exception
    deadline, labels = time.time() + 180, []
    while time.time() < deadline and "DER" not in labels:
        time.sleep(2)
        at.run()
        labels = [m.label for m in at.metric]
    assert not at.exception, at.exception
    assert "DER" in labels, (tmp_path / "worker.log").read_text() if (tmp_path / "worker.log").exists() else ""
    from runs.store import RunStore

    (rec,) = RunStore(tmp_path).list(defense="lens_example")
    assert rec.status == "finished" and rec.params["steps"] == 2 and rec.run_dir


def _site_dir(prefix: Path) -> Path:
    return next(prefix.rglob("*.pth")).parent


def test_new_defense_scaffold_installs_passes_its_test_and_is_listed(tmp_path):
    pkg = tmp_path / "my_defense"
    assert main(["new", "defense", "my_defense", "--out", str(pkg)]) == 0
    assert main(["new", "defense", "my_defense", "--out", str(pkg)]) == 2  # never overwrites
    assert main(["new", "defense", "My-Defense", "--out", str(tmp_path / "x")]) == 2
    assert main(["new", "defense", "finetune", "--out", str(tmp_path / "y")]) == 2
    prefix = tmp_path / "prefix"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                          "--prefix", str(prefix), "-e", str(pkg)], capture_output=True, text=True, timeout=120)
    assert pip.returncode == 0, pip.stderr
    site = _site_dir(prefix)  # the installed .pth and .dist-info, read as a site folder by these subprocesses
    boot = f"import site, sys; site.addsitedir({str(site)!r}); sys.argv[0] = 'x'; "
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    test = subprocess.run([sys.executable, "-c", boot + "import pytest; sys.exit(pytest.main(['-q', '-p', "
                           f"'no:cacheprovider', {str(pkg / 'tests')!r}]))"], capture_output=True, text=True,
                          timeout=300, cwd=str(pkg), env=env)
    assert test.returncode == 0, test.stdout[-2000:] + test.stderr[-2000:]
    assert "2 passed" in test.stdout
    listed = subprocess.run([sys.executable, "-c", boot + "from backdoor_lens.cli import main; "
                             "sys.exit(main(['defenses']))"], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "my_defense" in listed.stdout and "My defense" in listed.stdout and "refused" not in listed.stderr


def test_new_attack_scaffold_writes_a_package_with_its_entry_point(tmp_path, capsys):
    assert main(["new", "attack", "my_attack", "--out", str(tmp_path / "a")]) == 0
    declared = _declared(tmp_path / "a" / "pyproject.toml", "backdoor_lens.attacks")
    assert declared == {"my_attack": "my_attack.attack:MyAttack"}
    assert (tmp_path / "a" / "tests" / "test_my_attack.py").is_file()
    assert "pip install -e" in capsys.readouterr().out
