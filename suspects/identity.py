"""A model's identity: the fingerprint of its weights and data, not the string that names it.

``demo:badnets``, its bundle folder ``assets/demo/suspects/badnets`` and an uploaded copy of the same weights are one
model: :func:`fingerprint` gives all three the same key, so the run store (``runs.identity``), stored scans and
stress references key on it and a name is only a way to find it.

- :func:`fingerprint`: SHA-256 of the weights (:func:`suspects.metrics.model_fingerprint`: names, dtypes, shapes,
  values), the skip-connection scales that differ from 1 (a shortcut-suppressed model keeps its weights and changes
  only those) and the data source the model is measured on (the card's ``data`` spec). Neither the name, the path,
  the creation date nor the trigger take part: the trigger is a property of the attack under study, and the
  same weights under a recovered trigger are still the same model.
- :func:`ref_fingerprint`: the fingerprint of a suspect reference (``demo:NAME``, a folder, a state dict), cached
  per file size and modification time so that listing runs does not reload a model that has not changed.
- :func:`demo_name`: ``demo:NAME`` of a bundled demo suspect reached by any name (the folder, a copy of its weights).
- :func:`find_clean_reference`: the clean model of a suspect's family (the stress test's reference), found by
  fingerprint, so the folder, the demo name and an upload of the same weights find the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from .metrics import model_fingerprint
from .models import get_skip_gammas
from .store import CARD_FILE, DEMO_SUSPECTS, MODEL_FILE, Suspect, list_demo_suspects

__all__ = ["fingerprint", "fingerprint_of", "ref_fingerprint", "demo_name", "demo_fingerprints",
           "find_clean_reference", "bundle_name", "CLEAN_DEMO"]

CLEAN_DEMO = "demo:clean"


def fingerprint_of(model: Any, card: dict[str, Any]) -> str:
    """:func:`fingerprint` of a model and the card that says which data it is measured on."""
    h = hashlib.sha256()
    h.update(model_fingerprint(model).encode())
    h.update(json.dumps(get_skip_gammas(model, non_default_only=True), sort_keys=True).encode())
    h.update(json.dumps(card.get("data"), sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def fingerprint(suspect: Suspect) -> str:
    """The identity of ``suspect``: its weights (with non-default skip scales) and its data source (32 hex digits)."""
    return fingerprint_of(suspect.model, suspect.card)


# --- references -> fingerprints, cached per file state ---------------------------------------------------------

_CACHE: dict[tuple, str] = {}
_LOCK = threading.Lock()


def _files_of(ref: str) -> list[Path] | None:
    """The files whose state decides the fingerprint of ``ref`` (weights and card), or None when ``ref`` names
    nothing on disk."""
    if ref.startswith("demo:"):
        folder = DEMO_SUSPECTS / ref[5:]
    elif ref.startswith("zoo:"):
        from .zoo import default_zoo

        try:
            zoo = default_zoo()
            folder = zoo.path(zoo.entry(ref))
        except (ValueError, OSError, RuntimeError):
            return None
    else:
        folder = Path(ref).expanduser()
    if folder.is_dir():
        return [folder / MODEL_FILE, folder / CARD_FILE]
    if folder.is_file():
        return [folder]
    return None


def _state(files: list[Path]) -> tuple:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(f), None, None))
    return tuple(out)


def ref_fingerprint(ref: str, **load_kw: Any) -> str | None:
    """The :func:`fingerprint` of the suspect ``ref`` names, or None when it cannot be loaded (a folder since
    deleted, a path relative to another working folder). Cached while its files keep their size and date."""
    from .store import load

    ref = str(ref).strip()
    files = _files_of(ref)
    if files is None:
        return None
    key = (_state(files), json.dumps(load_kw, sort_keys=True, default=str))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    try:
        fp = fingerprint(load(ref, **load_kw))
    except Exception:  # noqa: BLE001 - an unreadable reference has no known identity
        return None
    with _LOCK:
        _CACHE[key] = fp
    return fp


def demo_fingerprints() -> dict[str, str]:
    """``demo:NAME`` -> fingerprint of every bundled demo suspect (cached per file state)."""
    out = {}
    for name in list_demo_suspects():
        fp = ref_fingerprint(f"demo:{name}")
        if fp is not None:
            out[f"demo:{name}"] = fp
    return out


def bundle_name(path: str | os.PathLike | None) -> str | None:
    """``demo:NAME`` when ``path`` is a demo suspect's folder in the bundle (any spelling of the path), else None."""
    if path is None:
        return None
    try:
        rel = Path(path).expanduser().resolve().relative_to(DEMO_SUSPECTS.resolve())
    except (ValueError, OSError):
        return None
    return f"demo:{rel.parts[0]}" if len(rel.parts) == 1 else None


def demo_name(ref: str | None = None, suspect: Suspect | None = None) -> str | None:
    """``demo:NAME`` when ``ref`` / ``suspect`` is a bundled demo suspect under any name: ``demo:NAME`` itself, its
    folder (any spelling of the path), or another copy of the same weights and data (an upload); else None."""
    if ref is not None:
        text = str(ref).strip()
        if text.startswith("demo:"):
            return text
        found = bundle_name(Path(text))
        if found:
            return found
    if suspect is not None:
        found = bundle_name(suspect.path)
        if found:
            return found
        fp = fingerprint(suspect)
    elif ref is not None:
        fp = ref_fingerprint(str(ref))
    else:
        return None
    if fp is None:
        return None
    return next((name for name, other in demo_fingerprints().items() if other == fp), None)


def _read_card(ref: str) -> dict[str, Any] | None:
    folder = DEMO_SUSPECTS / ref[5:] if ref.startswith("demo:") else Path(ref).expanduser()
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def find_clean_reference(suspect: Suspect, ref: str | None = None, _depth: int = 0) -> str | None:
    """The clean model of ``suspect``'s family as a suspect reference (the stress test's reference), or None.

    In order: a card that names one (``provenance.clean_reference``); a demo suspect under any name (``demo:NAME``,
    its folder, an upload of its weights: :func:`demo_name`) has ``demo:clean``; a repaired model (provenance
    ``source: defense``) or a suspect with an adopted trigger has its parent's, the parent found by the fingerprint
    the run store records (``provenance.parent_fingerprint``) or else by the name it was given (``parent``).
    ``demo:clean`` is its own reference (the caller then runs without a separate one).
    """
    return _clean_reference(suspect.card, ref, suspect, _depth)


def _clean_reference(card: dict[str, Any], ref: str | None, suspect: Suspect | None, depth: int) -> str | None:
    prov = card.get("provenance") or {}
    if prov.get("clean_reference"):
        return str(prov["clean_reference"])
    if demo_name(ref, suspect) is not None:
        return CLEAN_DEMO
    parent = prov.get("parent")
    if prov.get("source") not in ("defense", "recovered trigger") or depth > 8:
        return None
    parent_fp = prov.get("parent_fingerprint")
    if parent_fp:
        named = next((name for name, fp in demo_fingerprints().items() if fp == parent_fp), None)
        if named is not None:
            return CLEAN_DEMO
    if not parent:
        return None
    parent = str(parent)
    if parent.startswith("demo:") or bundle_name(Path(parent)):
        return CLEAN_DEMO
    parent_card = _read_card(parent)  # the parent's card only, no weights
    if parent_card is None:
        return None
    return _clean_reference(parent_card, parent, None, depth + 1)
