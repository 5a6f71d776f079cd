"""The one-way import rule (docs/architecture.md): dashboard / cli -> runs -> defenses -> analysis -> suspects.

Checked from the source's AST, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "suspects": set(),
    "analysis": {"suspects"},
    "defenses": {"analysis", "suspects"},
    "runs": {"defenses", "analysis", "suspects"},
    "dashboard": {"runs", "defenses", "analysis", "suspects"},
    "backdoor_lens": {"dashboard", "runs", "defenses", "analysis", "suspects"},
}
UI_ONLY = {"streamlit"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def package_files() -> list[tuple[str, Path]]:
    return [(pkg, f) for pkg in ALLOWED for f in sorted((ROOT / pkg).rglob("*.py"))]


@pytest.mark.parametrize(("package", "path"), package_files(), ids=lambda v: str(v).replace(str(ROOT) + "/", ""))
def test_no_upward_import(package: str, path: Path) -> None:
    roots = imported_roots(path)
    project = roots & set(ALLOWED)
    upward = project - ALLOWED[package] - {package}
    assert not upward, f"{path.relative_to(ROOT)} ({package}) imports {sorted(upward)}; allowed: {sorted(ALLOWED[package])}"
    if package not in ("dashboard", "backdoor_lens"):
        assert not roots & UI_ONLY, f"{path.relative_to(ROOT)} imports Streamlit below the dashboard"


def test_every_package_is_checked() -> None:
    """A new top-level package must get a place in the rule."""
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert found <= set(ALLOWED) | {"tests", "scripts"}, sorted(found - set(ALLOWED))


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from runs.store import RunStore\n")
    assert "runs" in imported_roots(bad)
