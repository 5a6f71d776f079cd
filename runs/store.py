"""The run store: one folder per finished run, indexed in SQLite, under one root.

Root: :func:`runs_root` (``./lens-runs`` by default, moved by ``BACKDOOR_LENS_RUNS`` or an explicit path, CLI
``--runs``).

- ``index.sqlite`` holds one row per run (queued / running / finished / failed / cancelled / interrupted) with
  its progress, and the interim metrics it reported (table ``events``), so any page or tab can follow it.
- A finished run is the folder ``<root>/<run id>/`` with ``model.safetensors`` and ``suspect.json`` (the repaired
  suspect), ``report.json``, ``log.txt`` and the files the defense kept in the run's artifacts folder
  (``<root>/.<run id>.artifacts/`` while it runs, e.g. DBD's stage-1 backbone; :func:`run_file` finds them again from
  a run id). It is written to ``<root>/.<run id>.partial/`` and renamed when complete, and its row says ``finished`` only after the rename: a crash never leaves a run that looks complete.
- A run whose worker process died (a killed server, a crash) is marked ``interrupted``, never finished.
- A run records the identity of the suspect it was made on (``suspect_key``, :func:`suspects.identity.fingerprint`:
  weights and data, not the name it was given) and of the repaired model it made (``output_key``), so that
  ``demo:badnets``, its folder and an uploaded copy share one history (:mod:`runs.identity`). The repaired model's
  card names its run (``provenance.run_id``) and its parent's fingerprint (``provenance.parent_fingerprint``).
  Rows written before these columns existed get them added empty; :func:`runs.identity.migrate` fills them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sqlite3
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suspects.atomic import atomic_folder, write_json, write_text
from suspects.identity import fingerprint
from suspects.store import Suspect, write_suspect_files

__all__ = ["RunStore", "RunRecord", "runs_root", "STATUSES", "ACTIVE", "run_file", "DEFAULT_FOLDER",
           "ENV_VAR", "INDEX_FILE"]

STATUSES = ("queued", "running", "finished", "failed", "cancelled", "interrupted")
ACTIVE = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    defense TEXT NOT NULL,
    suspect TEXT NOT NULL,
    preset TEXT,
    params TEXT,
    pool_size INTEGER,
    seed INTEGER,
    device TEXT,
    status TEXT NOT NULL,
    progress REAL DEFAULT 0,
    message TEXT DEFAULT '',
    created REAL,
    started REAL,
    finished REAL,
    pid INTEGER,
    cancel INTEGER DEFAULT 0,
    run_dir TEXT,
    error TEXT,
    summary TEXT,
    suspect_key TEXT,
    output_key TEXT
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    t REAL NOT NULL,
    fraction REAL,
    message TEXT,
    metrics TEXT
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id);
"""
_ADDED_COLUMNS = {"suspect_key": "TEXT", "output_key": "TEXT"}  # columns added after the first stores were written


ENV_VAR = "BACKDOOR_LENS_RUNS"
DEFAULT_FOLDER = "lens-runs"
INDEX_FILE = "index.sqlite"
_LEGACY_FOLDER = "runs"  # the default before the ``runs`` package took that name
_told_legacy: set[Path] = set()


def runs_root(override: str | os.PathLike | None = None) -> Path:
    """The run-store folder: ``override`` (CLI ``--runs``), else ``$BACKDOOR_LENS_RUNS``, else ``./lens-runs``.

    A store left at the old default ``./runs`` (it holds ``index.sqlite``) keeps being used while ``./lens-runs``
    does not exist, so no run is lost; the user is told once where the new default is.
    """
    chosen = override or os.environ.get(ENV_VAR)
    if chosen:
        return Path(chosen).expanduser().resolve()
    new = Path(DEFAULT_FOLDER).resolve()
    legacy = Path(_LEGACY_FOLDER).resolve()
    if not new.exists() and (legacy / INDEX_FILE).is_file():
        if legacy not in _told_legacy:
            _told_legacy.add(legacy)
            print(f"backdoor-lens: using the run store at {legacy} (the old default). The default is now "
                  f"./{DEFAULT_FOLDER}: move the folder there, or set {ENV_VAR}={legacy} (or pass --runs) to "
                  "keep it where it is.", file=sys.stderr)
        return legacy
    return new

_FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def run_file(ref: str, filename: str, root: str | os.PathLike | None = None) -> Path:
    """``filename`` of a finished run, given the run's id, its folder, or the file itself.

    A run id is looked up in the store under ``root``, else in :func:`runs_root`.
    Raises FileNotFoundError with the places tried.
    """
    ref = str(ref).strip()
    if not ref:
        raise FileNotFoundError("no run given")
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidates = [path / filename]
    elif _RUN_ID.match(ref):
        roots = [Path(r).expanduser().resolve() for r in (root, runs_root()) if r is not None]
        candidates = [r / ref / filename for r in dict.fromkeys(roots)]
    else:
        candidates = []
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates) or ref
    raise FileNotFoundError(f"no finished run with {filename} found for {ref!r} (tried {tried})")


def _with_run_provenance(suspect: Suspect, run_id: str, parent_key: str | None) -> Suspect:
    """A shallow copy of a repaired ``suspect`` whose card names the run that made it and its parent's fingerprint
    (cards of other models are left as they are)."""
    prov = suspect.card.get("provenance") or {}
    if prov.get("source") != "defense":
        return suspect
    out = copy.copy(suspect)
    out.card = {**suspect.card, "provenance": {**prov, "run_id": run_id,
                                               **({"parent_fingerprint": parent_key} if parent_key else {})}}
    return out


@dataclass
class RunRecord:
    id: str
    defense: str
    suspect: str
    preset: str
    params: dict
    pool_size: int
    seed: int
    device: str | None
    status: str
    progress: float
    message: str
    created: float
    started: float | None
    finished: float | None
    pid: int | None
    cancel: bool
    run_dir: str | None
    error: str | None
    summary: dict | None
    suspect_key: str | None = None
    output_key: str | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (finished child not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class RunStore:
    """SQLite-indexed run folders under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = runs_root(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / INDEX_FILE
        with self._conn() as c:
            c.executescript(_SCHEMA)
            have = {row["name"] for row in c.execute("PRAGMA table_info(runs)").fetchall()}
            for col, kind in _ADDED_COLUMNS.items():
                if col not in have:  # an older store: the column is added empty (runs.identity.migrate fills it)
                    try:
                        c.execute(f"ALTER TABLE runs ADD COLUMN {col} {kind}")
                    except sqlite3.OperationalError:  # another process added it meanwhile
                        pass

    @contextmanager
    def _conn(self):
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.row_factory = sqlite3.Row
            yield conn
        finally:
            conn.close()

    # --- writing -------------------------------------------------------------------------------------
    def create(self, defense: str, suspect: str, preset: str, params: dict, pool_size: int, seed: int,
               device: str | None = None, pid: int | None = None, suspect_key: str | None = None) -> str:
        """Add a run: queued, or already running under ``pid`` (a foreground run no worker may claim).
        ``suspect_key``: the suspect's :func:`suspects.identity.fingerprint` (its history's key)."""
        run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{defense}-{uuid.uuid4().hex[:6]}"
        now = time.time()
        with self._conn() as c:
            c.execute("INSERT INTO runs (id, defense, suspect, preset, params, pool_size, seed, device, status, "
                      "created, started, pid, suspect_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (run_id, defense, suspect, preset, json.dumps(params), pool_size, seed, device,
                       "queued" if pid is None else "running", now, None if pid is None else now, pid, suspect_key))
        return run_id

    def claim_next(self, pid: int) -> RunRecord | None:
        """Atomically take the oldest queued run and mark it running under ``pid``."""
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            row = c.execute("SELECT id FROM runs WHERE status = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                c.execute("COMMIT")
                return None
            c.execute("UPDATE runs SET status = 'running', pid = ?, started = ?, message = 'starting' WHERE id = ?",
                      (pid, time.time(), row["id"]))
            c.execute("COMMIT")
        return self.get(row["id"])

    def mark_running(self, run_id: str, pid: int) -> None:
        with self._conn() as c:
            c.execute("UPDATE runs SET status = 'running', pid = ?, started = ? WHERE id = ?",
                      (pid, time.time(), run_id))

    def update_progress(self, run_id: str, fraction: float, message: str, metrics: dict | None = None) -> None:
        metrics = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and v == v}
        with self._conn() as c:
            c.execute("UPDATE runs SET progress = ?, message = ? WHERE id = ?", (float(fraction), message, run_id))
            if metrics:
                c.execute("INSERT INTO events (run_id, t, fraction, message, metrics) VALUES (?, ?, ?, ?, ?)",
                          (run_id, time.time(), float(fraction), message, json.dumps(metrics)))

    def artifacts_dir(self, run_id: str) -> Path:
        """The folder a running run owns for the files its defense keeps (moved into the run folder by :meth:`finish`)."""
        return self.root / f".{run_id}.artifacts"

    def finish(self, run_id: str, report: dict[str, Any], suspect: Suspect, log: str = "") -> Path:
        """Write the run folder atomically (with the files of :meth:`artifacts_dir`), then mark the run finished."""
        kept = sorted(p for p in self.artifacts_dir(run_id).glob("*") if p.is_file())
        for f in kept:
            stem = f.name.split(".", 1)[0]
            if not _FILE_NAME.match(stem) or stem in ("model", "suspect", "report", "log"):
                raise ValueError(f"invalid run file name {f.name!r} (lower-case letters, digits, '_' and '-')")
        final = self.root / run_id
        rec = self.get(run_id)
        suspect = _with_run_provenance(suspect, run_id, rec.suspect_key if rec is not None else None)
        output_key = fingerprint(suspect)
        with atomic_folder(final, partial=self._partial(run_id)) as partial:
            write_suspect_files(suspect, partial)
            for f in kept:
                shutil.copy2(f, partial / f.name)
            report = {**report, "run_id": run_id, "run_dir": str(final), "output_fingerprint": output_key}
            if rec is not None and rec.suspect_key:
                report["suspect_fingerprint"] = rec.suspect_key
            write_json(partial / "report.json", report, indent=2, default=str)
            write_text(partial / "log.txt", log)
        shutil.rmtree(self.artifacts_dir(run_id), ignore_errors=True)
        summary = {k: report.get(k) for k in ("ba_before", "asr_before", "ra_before", "ba", "asr", "ra", "der",
                                              "seconds", "device")}
        with self._conn() as c:
            c.execute("UPDATE runs SET status = 'finished', progress = 1, message = 'finished', finished = ?, "
                      "run_dir = ?, summary = ?, output_key = ? WHERE id = ?",
                      (time.time(), str(final), json.dumps(summary), output_key, run_id))
        return final

    def fail(self, run_id: str, error: str, status: str = "failed") -> None:
        if status not in STATUSES:
            raise ValueError(status)
        with self._conn() as c:
            c.execute("UPDATE runs SET status = ?, error = ?, finished = ?, message = ? WHERE id = ?",
                      (status, error, time.time(), status, run_id))
        shutil.rmtree(self._partial(run_id), ignore_errors=True)
        shutil.rmtree(self.artifacts_dir(run_id), ignore_errors=True)

    def _partial(self, run_id: str) -> Path:
        """Where a run's folder is written before it is complete (``finish`` renames it)."""
        return self.root / f".{run_id}.partial"

    def request_cancel(self, run_id: str) -> None:
        """Ask a run to stop; a queued run is cancelled at once."""
        with self._conn() as c:
            c.execute("UPDATE runs SET cancel = 1 WHERE id = ?", (run_id,))
            c.execute("UPDATE runs SET status = 'cancelled', finished = ?, message = 'cancelled' "
                      "WHERE id = ? AND status = 'queued'", (time.time(), run_id))

    def cancel_requested(self, run_id: str) -> bool:
        with self._conn() as c:
            row = c.execute("SELECT cancel FROM runs WHERE id = ?", (run_id,)).fetchone()
        return bool(row and row["cancel"])

    def reconcile(self) -> list[str]:
        """Mark running runs whose process is gone as interrupted; return their ids."""
        gone = []
        for rec in self.list(status="running"):
            if not _pid_alive(rec.pid):
                self.fail(rec.id, "the worker process ended before the run finished (server restart or crash)",
                          status="interrupted")
                gone.append(rec.id)
        return gone

    # --- reading -------------------------------------------------------------------------------------
    def _record(self, row: sqlite3.Row) -> RunRecord:
        d = dict(row)
        d["params"] = json.loads(d["params"] or "{}")
        d["summary"] = json.loads(d["summary"]) if d["summary"] else None
        d["cancel"] = bool(d["cancel"])
        return RunRecord(**d)

    def get(self, run_id: str) -> RunRecord | None:
        with self._conn() as c:
            row = c.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._record(row) if row else None

    def list(self, status: str | None = None, suspect: str | None = None, defense: str | None = None,
             suspect_key: str | None = None) -> list[RunRecord]:
        """Runs, newest first, filtered by status, the suspect's name as recorded, defense and suspect fingerprint
        (:func:`runs.identity.runs_of` finds a model's runs under any of its names)."""
        q, args = "SELECT * FROM runs WHERE 1 = 1", []
        for col, val in (("status", status), ("suspect", suspect), ("defense", defense), ("suspect_key", suspect_key)):
            if val is not None:
                q += f" AND {col} = ?"
                args.append(val)
        with self._conn() as c:
            rows = c.execute(q + " ORDER BY created DESC", args).fetchall()
        return [self._record(r) for r in rows]

    def events(self, run_id: str) -> list[dict]:
        with self._conn() as c:
            rows = c.execute("SELECT t, fraction, message, metrics FROM events WHERE run_id = ? ORDER BY t",
                             (run_id,)).fetchall()
        return [{"t": r["t"], "fraction": r["fraction"], "message": r["message"], **json.loads(r["metrics"])}
                for r in rows]

    def report(self, run_id: str) -> dict | None:
        rec = self.get(run_id)
        if rec is None or rec.status != "finished" or not rec.run_dir:
            return None
        path = Path(rec.run_dir) / "report.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def finished_suspects(self) -> list[str]:
        """Folders of finished runs that are complete on disk (model, card and report present)."""
        out = []
        for rec in self.list(status="finished"):
            d = Path(rec.run_dir or "")
            if all((d / f).is_file() for f in ("model.safetensors", "suspect.json", "report.json")):
                out.append(str(d))
        return out
