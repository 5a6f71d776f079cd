"""Suspect references as the browser sees them: the page URL carries no absolute server path (issue 27.8).

A run-store suspect's folder is written as ``runs:<path inside the run store>``, another folder under the working
directory relative to it; :func:`from_url` turns either back into the picker's reference. UI only.
"""

from __future__ import annotations

from pathlib import Path

from runs.store import runs_root

__all__ = ["to_url", "from_url"]

RUNS_PREFIX = "runs:"


def to_url(ref: str) -> str:
    """``ref`` for the URL: ``demo:NAME`` as it is, a run-store folder as ``runs:REL``, a folder under the working
    directory relative to it; any other path as it is (only a suspect named so on the command line)."""
    if ref.startswith(("demo:", "zoo:")):
        return ref
    p = Path(ref)
    for base, prefix in ((runs_root(), RUNS_PREFIX), (Path.cwd().resolve(), "")):
        try:
            return prefix + p.resolve().relative_to(base).as_posix()
        except ValueError:
            continue
    return ref


def from_url(value: str | None, choices: list[str]) -> str | None:
    """The picker's reference that ``value`` (a URL parameter, or a reference) names, or ``value`` itself."""
    if not value or value in choices or value.startswith(("demo:", "zoo:")):
        return value
    path = runs_root() / value[len(RUNS_PREFIX):] if value.startswith(RUNS_PREFIX) else Path(value)
    full = str(path.resolve())
    if full in choices:
        return full
    by_path = {str(Path(c).resolve()): c for c in choices if not c.startswith(("demo:", "zoo:"))}
    return by_path.get(full, value)
