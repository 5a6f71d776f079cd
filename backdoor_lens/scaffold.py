"""``backdoor-lens new defense|attack NAME``: a minimal installable plugin package (docs/plugins.md).

The package holds a ``pyproject.toml`` that declares the entry point (``backdoor_lens.defenses`` or
``backdoor_lens.attacks``), one module with a working example (a defense that fine-tunes on the clean pool with
label smoothing, reporting progress through ``ctx.tick``; an attack that draws a frame around the image) and a test
that runs it through the public API. After ``pip install -e DIR`` the method is listed by ``backdoor-lens defenses``
/ ``attacks`` and the dashboard shows it like a built-in one.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from pathlib import Path

__all__ = ["KINDS", "write_scaffold", "check_name"]

KINDS = ("defense", "attack")

_PYPROJECT = '''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "__NAME__"
version = "0.1.0"
description = "__TITLE__: a Backdoor Lens __KIND__ plugin"
requires-python = ">=3.10"
dependencies = ["backdoor-lens"]

# this line is the whole plugin mechanism: Backdoor Lens's __KIND__ registry reads this entry point
[project.entry-points."backdoor_lens.__GROUP__"]
__NAME__ = "__NAME__.__MODULE__:__CLASS__"

[tool.setuptools]
packages = ["__NAME__"]
'''

_README = '''# __NAME__

__TITLE__: a Backdoor Lens __KIND__ plugin, written by `backdoor-lens new __KIND__ __NAME__`.

```bash
pip install -e .                 # offline: pip install --no-build-isolation -e .
python -m pytest tests           # the example's own test
backdoor-lens __LIST__           # lists __NAME__ next to the built-in ones
backdoor-lens plugins            # what was loaded, or why it was refused
```

Edit `__NAME__/__MODULE__.py`; the interface and what it guarantees are in Backdoor Lens's `docs/plugins.md`.
'''

_DEFENSE = '''"""__TITLE__: a Backdoor Lens defense plugin (the example of ``backdoor-lens new defense``).

The example fine-tunes the suspect on the clean defense pool with label-smoothed cross-entropy (Szegedy et al.,
CVPR 2016, label smoothing), reports progress with ``ctx.tick`` (which also raises ``Cancelled`` when the user
cancels) and returns the repaired model with a loss curve. Replace ``repair`` with your method; keep the class
attributes: the dashboard draws the card and its widgets from them, the CLI its ``--set`` flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defenses.base import Defense, DefenseOutput, RepairContext, ThreatModel, param


@dataclass
class __CLASS__Params:
    """Every field becomes a widget on the Defenses page and a ``--set name=value`` flag (with its range checked)."""

    steps: int = param(200, help="optimisation steps (batches of the clean pool)", min=1, max=100000, integer=True)
    lr: float = param(0.01, help="SGD learning rate", min=1e-6, max=1.0)
    batch_size: int = param(64, help="images per step", min=1, max=4096, integer=True)
    smoothing: float = param(0.1, help="label smoothing epsilon", min=0.0, max=0.9)


class __CLASS__(Defense):
    name = "__NAME__"
    title = "__TITLE__"
    paper = "your paper (venue, year)"
    summary = "Fine-tunes the suspect on the clean pool with label smoothing (an example to replace with your method)."
    threat = ThreatModel(clean_pool=True)
    Params = __CLASS__Params
    presets = {"quick": {"steps": 20}, "paper": {}}
    curve_labels = {"loss": "training loss per step"}

    def repair(self, model: torch.nn.Module, params: __CLASS__Params, ctx: RepairContext) -> DefenseOutput:
        x, y = ctx.pool.x, ctx.pool.y  # clean images in [0, 1] and labels; ctx.pool.x_val / y_val are held out
        gen = torch.Generator().manual_seed(ctx.seed)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=params.lr, momentum=0.9)
        model.train()
        losses = []
        for step in range(params.steps):
            idx = torch.randint(len(x), (min(params.batch_size, len(x)),), generator=gen)
            xb, yb = x[idx].to(ctx.device), y[idx].to(ctx.device)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=params.smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            ctx.tick((step + 1) / params.steps, f"step {step + 1} of {params.steps}", {"loss": losses[-1]})
        model.eval()
        with torch.no_grad():
            held_out = (model(ctx.pool.x_val.to(ctx.device)).argmax(1).cpu() == ctx.pool.y_val).float().mean()
        return DefenseOutput(model, artifacts={"held_out_ba": float(held_out)}, curves={"loss": losses})
'''

_DEFENSE_TEST = '''"""__NAME__ through Backdoor Lens's public API: found by the registry, run on a demo suspect."""

import suspects
from defenses import get_defense, list_defenses, run_defense


def test_registered_with_its_presets():
    assert "__NAME__" in list_defenses(), "install the package first: pip install -e ."
    defense = get_defense("__NAME__")
    assert defense.make_params("paper").steps == 200


def test_repairs_a_demo_suspect():
    # a few steps on 100 pool images, measured on 100 test images: seconds on a CPU
    report = run_defense("__NAME__", suspects.load("demo:badnets"), preset="quick",
                         overrides={"steps": 4, "batch_size": 16}, pool_size=100, measure="subset:100")
    assert 0.0 <= report["ba"] <= 1.0 and 0.0 <= report["asr"] <= 1.0
    assert len(report["curves"]["loss"]) == 4
'''

_ATTACK = '''"""__TITLE__: a Backdoor Lens attack plugin (the example of ``backdoor-lens new attack``).

The example trigger draws a frame ``width`` pixels wide, of intensity ``value``, around the image. A trigger is a
deterministic transform of a batch of images in [0, 1]; ``defaults`` are its parameters (``--attack-param``). Train
a suspect with it: ``backdoor-lens train --data demo --attack __NAME__ --out my-suspect``.
"""

from __future__ import annotations

import torch

from suspects.triggers import Trigger


class __CLASS__(Trigger):
    name = "__NAME__"
    description = "a frame around the image (an example to replace with your trigger)"
    defaults = {"width": 1, "value": 1.0}
    clean_label = False  # True: poison only target-class images and keep their labels

    def _validate(self) -> None:
        _, h, w = self.input_shape
        if not 1 <= int(self.params["width"]) < min(h, w) // 2:
            raise ValueError(f"__NAME__: width must lie in [1, {min(h, w) // 2}), got {self.params['width']}")
        if not 0.0 <= float(self.params["value"]) <= 1.0:
            raise ValueError(f"__NAME__: value must lie in [0, 1], got {self.params['value']}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        k, v = int(self.params["width"]), float(self.params["value"])
        out = x.clone()
        out[..., :k, :] = v
        out[..., -k:, :] = v
        out[..., :, :k] = v
        out[..., :, -k:] = v
        return out
'''

_ATTACK_TEST = '''"""__NAME__ through Backdoor Lens's public API: found by the registry, deterministic, poisons a plan."""

import torch

from suspects.triggers import list_triggers, make_trigger


def test_registered():
    assert "__NAME__" in list_triggers(), "install the package first: pip install -e ."


def test_changes_the_frame_only_and_is_deterministic():
    trigger = make_trigger("__NAME__", (1, 28, 28), 10, target=3)
    x = torch.rand(4, 1, 28, 28)
    out = trigger(x)
    changed = (out != x).any(dim=(0, 1))
    assert changed[0].all() and changed[:, 0].all() and not changed[2:-2, 2:-2].any()
    assert torch.equal(out, trigger(x))
    assert trigger.target_labels(torch.tensor([0, 5])).tolist() == [3, 3]


def test_plans_a_poisoning():
    labels = torch.arange(100) % 10
    plan = make_trigger("__NAME__", (1, 28, 28), 10).plan(labels, rate=0.1, seed=0)
    assert len(plan.poison_idx) == 10 and not (labels[plan.poison_idx] == 0).any()
'''


def check_name(kind: str, name: str) -> None:
    """Raise ValueError unless ``name`` can name a new ``kind`` and its package."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or "") or keyword.iskeyword(name):
        raise ValueError(f"NAME must be a lower-case Python identifier (letters, digits, '_'), got {name!r}")
    if kind == "defense":
        from defenses.registry import list_defenses

        taken = list_defenses()
    else:
        from suspects.triggers import list_triggers

        taken = list_triggers(include_recovered=True)
    if name in taken:
        raise ValueError(f"{name!r} is already a registered {kind}; choose another name")
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin not in (None, "namespace"):  # a folder of that name is no module yet
        raise ValueError(f"a Python module named {name!r} already exists here; choose another name")


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(f"__{key}__", value)
    return text


def write_scaffold(kind: str, name: str, out: Path | str | None = None) -> list[Path]:
    """Write the plugin package for a new ``kind`` (``defense`` or ``attack``) called ``name`` into ``out`` (default
    ``./NAME``); return the files written. Refuses a bad name and a folder that exists and is not empty."""
    root = Path(out) if out is not None else Path(name)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not empty; choose another --out")
    check_name(kind, name)
    values = {
        "NAME": name,
        "CLASS": "".join(part.capitalize() for part in name.split("_") if part) or "Plugin",
        "TITLE": name.replace("_", " ").capitalize(),
        "KIND": kind,
        "GROUP": "defenses" if kind == "defense" else "attacks",
        "MODULE": kind,
        "LIST": "defenses" if kind == "defense" else "attacks",
    }
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{name}/__init__.py": f'"""{values["TITLE"]}: a Backdoor Lens {kind} plugin."""\n',
        f"{name}/{kind}.py": _DEFENSE if kind == "defense" else _ATTACK,
        f"tests/test_{name}.py": _DEFENSE_TEST if kind == "defense" else _ATTACK_TEST,
    }
    written = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_fill(text, values), encoding="utf-8")
        written.append(path)
    return written
