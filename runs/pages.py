"""Generated documentation pages: each is written by a script from a JSON store of measured cells, and each cell
records the fingerprint (:func:`suspects.identity.fingerprint`) of the weights it measured, so a test can tell a
page that still names weights which are no longer the demo bundle's or the zoo's.

A page keeps its hand-written prose; the measured part sits between two markers and is replaced as a whole
(:func:`splice`)::

    <!-- BEGIN GENERATED: detection (scripts/detection_doc.py) -->
    ...
    <!-- END GENERATED: detection -->
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["load_store", "save_store", "splice", "begin_marker", "end_marker", "recorded_fingerprints",
           "unknown_fingerprints", "machine_line", "machines_text", "write_or_check", "today"]

FINGERPRINT_KEYS = ("fingerprint", "reference_fingerprint")


def load_store(path: str | Path, empty: dict[str, Any] | None = None) -> dict[str, Any]:
    """The store at ``path``, or a copy of ``empty`` (default ``{"cells": {}}``) when there is none yet."""
    path = Path(path)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); restore it from git") from None
    return json.loads(json.dumps(empty if empty is not None else {"cells": {}}))


def save_store(store: dict[str, Any], path: str | Path) -> None:
    """Write ``store`` atomically (a crash mid-write leaves the previous store)."""
    from suspects.atomic import write_json

    write_json(Path(path), store, indent=1, default=str)


def begin_marker(name: str, script: str) -> str:
    return f"<!-- BEGIN GENERATED: {name} ({script}; edit the script, not this block) -->"


def end_marker(name: str) -> str:
    return f"<!-- END GENERATED: {name} -->"


def splice(text: str, name: str, script: str, block: str) -> str:
    """``text`` with the part between ``name``'s markers replaced by ``block`` (markers kept). A page without the
    markers is refused: the script never guesses where its numbers go."""
    begin, end = f"<!-- BEGIN GENERATED: {name} (", end_marker(name)
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"the page has no generated block {name!r}: put the lines {begin_marker(name, script)!r} and "
                         f"{end!r} where the measured numbers go")
    head = text[:i] + begin_marker(name, script) + "\n\n"
    return head + block.strip("\n") + "\n\n" + text[j:]


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def recorded_fingerprints(store: dict[str, Any]) -> set[str]:
    """Every fingerprint a store's cells name (keys ``fingerprint`` / ``reference_fingerprint`` at any depth)."""
    return {str(v) for k, v in _walk(store.get("cells", {})) if k in FINGERPRINT_KEYS and v}


def unknown_fingerprints(store: dict[str, Any]) -> set[str]:
    """The fingerprints ``store`` names that belong to no current test suspect (the demo bundle's, or one the zoo's
    manifest records or has built): a page measured on weights that have since changed."""
    from suspects.zoo import test_fingerprints

    return recorded_fingerprints(store) - set(test_fingerprints())


def machine_line() -> dict[str, Any]:
    """The machine a cell ran on (CPU, torch build and threads), as run reports record it."""
    from suspects.device import machine_info

    return dict(machine_info("cpu"))


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def _machine_text(m: dict[str, Any]) -> str:
    """``CPU[, CAPABILITY], torch VERSION, N threads`` of one recorded machine."""
    cpu = ", ".join(str(x) for x in (m.get("cpu"), m.get("cpu_capability")) if x)
    return f"{cpu}, torch {m.get('torch')}, {m.get('threads')} threads"


def machines_text(cells: list[dict[str, Any]]) -> str:
    """``DATES on MACHINE; MACHINE`` of the measured cells (each records ``measured`` and ``machine``)."""
    dates = sorted({c["measured"] for c in cells})
    machines = sorted({_machine_text(c["machine"]) for c in cells})
    return f"{', '.join(dates)} on {'; '.join(machines)}"


def write_or_check(doc: Path, text: str, check: bool) -> int:
    """Write ``text`` to ``doc``, or with ``check`` only say whether ``doc`` already holds it (exit status 1 if not)."""
    if check:
        same = doc.is_file() and doc.read_text() == text
        print(f"{doc.name} is up to date" if same else f"{doc.name} differs from the store's; regenerate it")
        return 0 if same else 1
    doc.write_text(text)
    print(f"wrote {doc}")
    return 0
