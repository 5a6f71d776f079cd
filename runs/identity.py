"""One history per model: a model's runs found by its fingerprint, under whatever name it was given.

A model's identity is :func:`suspects.identity.fingerprint` (its weights and data), not the string that names it:
``demo:badnets``, ``assets/demo/suspects/badnets`` and an upload of the same weights are one model with one list of
runs. Every run records the fingerprint of the suspect it was made on (``suspect_key``) and of the repaired model
it made (``output_key``; :mod:`runs.store`).

- :func:`runs_of`: the runs of a model, by fingerprint.
- :func:`family`: for a repaired model (a run's output), the run that made it, its parent and the parent's other
  runs (its siblings), and its own runs (children).
- :func:`resolve_ref` / :func:`short_ref`: what the CLI accepts besides ``demo:NAME`` and a folder (a run id, a
  folder under the run store such as ``uploads/NAME-HASH``), and the short name hints print (``demo:badnets``, a run
  id), never a server's absolute path when a shorter name exists.

**Stores written before fingerprints were recorded** keep working: :func:`migrate` fills ``suspect_key`` of an old
row by loading the suspect its name points to, but only when that suspect's weights file is older than the run (so
the run was made on those very weights; a demo bundle retrained since gets no false history), and ``output_key`` of
an old finished run from its folder. A row whose suspect cannot be loaded or has changed since is marked
``unknown`` and is still matched by name, exactly as before (:func:`runs_of`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from suspects.identity import bundle_name, demo_name, fingerprint, ref_fingerprint
from suspects.store import CARD_FILE, DEMO_SUSPECTS, MODEL_FILE, Suspect

from .store import INDEX_FILE, RunRecord, RunStore, runs_root

__all__ = ["UNKNOWN", "migrate", "runs_of", "same_model", "Family", "family", "resolve_ref", "short_ref",
           "run_of_folder", "made_by_text"]

UNKNOWN = "unknown"
"""``suspect_key`` of an old row whose suspect could not be identified: it is matched by name only."""

_REPORT = "report.json"


# --- names ------------------------------------------------------------------------------------------------------


def run_of_folder(path: str | os.PathLike | None) -> str | None:
    """The run id of a run folder (it holds ``report.json`` with a ``run_id``), else None."""
    if not path:
        return None
    try:
        rep = json.loads((Path(path) / _REPORT).read_text())
    except (OSError, ValueError):
        return None
    return str(rep.get("run_id") or Path(path).name) if isinstance(rep, dict) else None


def resolve_ref(ref: str, store: RunStore | None = None, root: str | os.PathLike | None = None) -> str:
    """A suspect reference as :func:`suspects.load` takes it: ``demo:NAME`` and existing paths unchanged; a run id
    of ``store`` (else of the store at ``root``, default :func:`runs.store.runs_root`) becomes its folder; a path
    under the run store (``uploads/NAME-HASH``, ``recovered/...``) becomes that folder. Anything else is returned as
    given (loading it then says what is wrong). No store is created."""
    text = str(ref).strip()
    if not text or text.startswith("demo:") or Path(text).expanduser().exists():
        return text
    base = store.root if store is not None else runs_root(root)
    if store is None and (base / INDEX_FILE).is_file():
        store = RunStore(base)
    rec = store.get(text) if store is not None else None
    if rec is not None and rec.run_dir and Path(rec.run_dir).is_dir():
        return rec.run_dir
    if (base / text / CARD_FILE).is_file():
        return str(base / text)
    return text


def short_ref(ref: str, store: RunStore | None = None, suspect: Suspect | None = None) -> str:
    """The shortest name the CLI accepts for ``ref``: ``demo:NAME`` for a demo suspect (under any name), the run id
    for a run's folder, a path relative to the run store (``uploads/...``) or to the working folder; the absolute
    path only when nothing shorter names it."""
    text = str(ref).strip()
    if text.startswith("demo:"):
        return text
    demo = demo_name(text, suspect)
    if demo is not None:
        return demo
    path = Path(text).expanduser()
    run_id = run_of_folder(path) if path.is_dir() else None
    if run_id is not None:
        return run_id
    root = store.root if store is not None else runs_root()
    for base in (root, Path.cwd()):
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except (ValueError, OSError):
            continue
    return text


# --- old rows -------------------------------------------------------------------------------------------------


def _weights_time(ref: str) -> float | None:
    """Modification time of the weights ``ref`` names (a folder's ``model.safetensors`` or the file itself)."""
    p = DEMO_SUSPECTS / ref[5:] if ref.startswith("demo:") else Path(ref).expanduser()
    f = p / MODEL_FILE if p.is_dir() else p
    try:
        return f.stat().st_mtime
    except OSError:
        return None


def migrate(store: RunStore) -> int:
    """Fill the fingerprints of rows written before they were recorded (see the module docstring); returns how many
    rows changed. Cheap when there is nothing to do (one query)."""
    with store._conn() as c:
        rows = c.execute("SELECT id, suspect, created, status, run_dir, suspect_key, output_key FROM runs WHERE "
                         "suspect_key IS NULL OR (status = 'finished' AND output_key IS NULL)").fetchall()
    if not rows:
        return 0
    keys: dict[str, str | None] = {}
    changed = 0
    for row in rows:
        updates: dict[str, str] = {}
        if row["suspect_key"] is None:
            ref = str(row["suspect"])
            if ref not in keys:
                keys[ref] = ref_fingerprint(ref)
            when = _weights_time(ref)
            fresh = when is not None and row["created"] is not None and when <= float(row["created"])
            updates["suspect_key"] = keys[ref] if keys[ref] is not None and fresh else UNKNOWN
        if row["status"] == "finished" and row["output_key"] is None:
            out = ref_fingerprint(row["run_dir"]) if row["run_dir"] else None
            updates["output_key"] = out or UNKNOWN
        if updates:
            with store._conn() as c:
                c.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in updates)} WHERE id = ?",
                          (*updates.values(), row["id"]))
            changed += 1
    return changed


# --- lookups --------------------------------------------------------------------------------------------------


def _legacy_match(rec: RunRecord, ref: str | None) -> bool:
    """An old row without a usable fingerprint: matched by the name it was given, as before fingerprints."""
    if ref is None or rec.suspect_key not in (None, UNKNOWN):
        return False
    return same_model(rec.suspect, ref, by_fingerprint=False)


def _canonical(ref: str) -> str:
    """``demo:NAME`` for a demo suspect's name or folder, else the resolved path."""
    text = str(ref).strip()
    if text.startswith("demo:"):
        return text
    return bundle_name(text) or str(Path(text).expanduser().resolve())


def same_model(a: str, b: str, by_fingerprint: bool = True) -> bool:
    """Whether two suspect references name one model: the same string, the same folder (by resolved path), one
    demo suspect under two names (``demo:badnets`` and its folder), or (``by_fingerprint``) the same fingerprint
    (an upload of the same weights)."""
    if a == b or _canonical(a) == _canonical(b):
        return True
    if not by_fingerprint:
        return False
    fa = ref_fingerprint(a)
    return fa is not None and fa == ref_fingerprint(b)


def runs_of(store: RunStore, ref: str | None = None, key: str | None = None, status: str | None = "finished",
            defense: str | None = None) -> list[RunRecord]:
    """The runs of one model, newest first: those whose ``suspect_key`` is the model's fingerprint (``key``, else
    that of ``ref``; a run id names its repaired model), plus old rows without a fingerprint recorded under the same
    name (``ref``)."""
    migrate(store)
    if ref is not None:
        ref = resolve_ref(ref, store)
    if key is None and ref is not None:
        key = ref_fingerprint(ref)
    out = []
    for rec in store.list(status=status, defense=defense):
        if (key is not None and rec.suspect_key == key) or _legacy_match(rec, ref):
            out.append(rec)
    return out


@dataclass
class Family:
    """A model's place among the runs: ``made_by`` is the run whose output it is (None for a model no run made),
    ``parent_ref`` / ``parent_key`` the suspect that run repaired, ``siblings`` every finished run on that parent
    (``made_by`` among them), ``children`` the finished runs on this model itself."""

    key: str
    made_by: RunRecord | None = None
    parent_ref: str | None = None
    parent_key: str | None = None
    siblings: list[RunRecord] = field(default_factory=list)
    children: list[RunRecord] = field(default_factory=list)

    @property
    def repaired(self) -> bool:
        return self.made_by is not None


def _made_by(store: RunStore, suspect: Suspect, ref: str, key: str) -> RunRecord | None:
    prov = suspect.card.get("provenance") or {}
    if prov.get("source") != "defense":
        return None
    candidates = [prov.get("run_id"), run_of_folder(suspect.path), run_of_folder(ref)]
    for run_id in candidates:
        rec = store.get(str(run_id)) if run_id else None
        if rec is not None and rec.status == "finished":
            return rec
    # a copy of a run's output elsewhere (e.g. uploaded again): the run whose output has these weights and data
    return next((r for r in store.list(status="finished") if r.output_key == key and r.suspect_key != key), None)


def family(store: RunStore, suspect: Suspect, ref: str, key: str | None = None) -> Family:
    """The family of ``suspect`` (named ``ref``): see :class:`Family`."""
    migrate(store)
    key = key or fingerprint(suspect)
    fam = Family(key, children=runs_of(store, ref, key))
    made = _made_by(store, suspect, ref, key)
    if made is None or made.suspect_key == key:
        return fam
    fam.made_by = made
    fam.parent_key = made.suspect_key if made.suspect_key not in (None, UNKNOWN) else None
    fam.parent_ref = _loadable_parent(made.suspect, fam.parent_key)
    fam.siblings = runs_of(store, fam.parent_ref or made.suspect, fam.parent_key)
    if not any(r.id == made.id for r in fam.siblings):  # an old row under a name that no longer loads
        fam.siblings = sorted([*fam.siblings, made], key=lambda r: r.created or 0, reverse=True)
    return fam


def _loadable_parent(name: str, key: str | None) -> str | None:
    """A reference that loads the parent: its demo name (when the fingerprint is a demo suspect's), else the name
    the run recorded when it still loads the same model."""
    if name.startswith("demo:"):
        return name
    demo = demo_name(name)
    if demo is not None:
        return demo
    if key is not None and ref_fingerprint(name) == key:
        return name
    if key is None and ref_fingerprint(name) is not None:
        return name
    return None


def made_by_text(fam: Family, store: RunStore | None = None) -> str:
    """``run RID (defense · preset · seed N) on PARENT``: what made a repaired model, in words (empty otherwise)."""
    rec = fam.made_by
    if rec is None:
        return ""
    parent = short_ref(fam.parent_ref or rec.suspect, store)
    return f"run {rec.id} ({rec.defense} · {rec.preset} · seed {rec.seed}) on {parent}"
