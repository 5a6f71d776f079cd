"""Stress tests of stored runs and suspects: the retuning attack (:mod:`defenses.stress`) around the run store.

- :func:`run_stress`: resolve a suspect reference or a run (id or folder), find its clean reference
  (:func:`suspects.identity.find_clean_reference`: by fingerprint, under any name), run the test, and store the
  result with the run (``stress.json`` in the run's folder, written atomically) so the Compare page, ``backdoor-lens compare`` and the HTML report show it.
- A job kind for the background worker (:mod:`runs.worker`): :func:`submit_stress` queues a stress test of a
  finished run in the table ``stress_jobs`` of the store's index; the worker takes queued stress tests after the
  queued defense runs, under the same per-device lock, and records progress the pages can follow
  (:func:`stress_job`, :func:`latest_stress_job`). Cancelling sets a flag checked at every progress report.
"""

from __future__ import annotations

import json
import os
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defenses.base import ParamError, params_from
from defenses.context import Cancelled, Progress
from defenses.stress import StressParams, stress_test
from suspects.atomic import write_json
from suspects.identity import bundle_name, find_clean_reference

from .store import RunStore, _pid_alive

__all__ = ["STRESS_FILE", "StressTarget", "resolve_target", "run_stress", "load_stress", "submit_stress",
           "claim_next_stress", "execute_stress", "stress_job", "latest_stress_job", "queued_stress",
           "cancel_stress", "StressJob", "DEFAULT_TRIGGER_SOURCE"]

STRESS_FILE = "stress.json"
DEFAULT_TRIGGER_SOURCE = "demo:badnets"
"""Where a demo suspect without a trigger (``demo:clean``) borrows the trigger of its poisoned samples."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stress_jobs (
    id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    params TEXT,
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
    error TEXT,
    result TEXT
);
"""


@dataclass(frozen=True)
class StressTarget:
    """What a stress test runs on: the suspect reference to load, and the run (id, folder) when it is a run."""

    suspect: str
    run_id: str | None = None
    run_dir: Path | None = None


def resolve_target(ref: str, store: RunStore | None = None) -> StressTarget:
    """A run id of ``store``, a run folder (it holds ``report.json``), or any suspect reference."""
    ref = str(ref).strip()
    if not ref:
        raise ValueError("no suspect or run given")
    if store is not None and not ref.startswith("demo:"):
        rec = store.get(ref)
        if rec is not None:
            if rec.status != "finished" or not rec.run_dir:
                raise ValueError(f"run {ref} is {rec.status}; only a finished run can be stress-tested")
            return StressTarget(rec.run_dir, rec.id, Path(rec.run_dir))
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "report.json").is_file():
        try:
            run_id = json.loads((path / "report.json").read_text()).get("run_id")
        except (OSError, json.JSONDecodeError):
            run_id = None
        return StressTarget(str(path.resolve()), run_id or path.name, path.resolve())
    return StressTarget(ref)


def load_stress(run_dir: str | os.PathLike | None) -> dict | None:
    """The stored stress-test result of a run folder, or None."""
    if not run_dir:
        return None
    try:
        return json.loads((Path(run_dir) / STRESS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_stress(ref: str, store: RunStore | None = None, params: dict[str, Any] | StressParams | None = None, *,
               reference: str | None = None, trigger_from: str | None = None, device: str | None = None,
               seed: int = 0, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
               save: bool = True) -> dict[str, Any]:
    """Stress-test ``ref`` (suspect reference, run id or run folder) against its clean reference (``reference``
    overrides the one found from the card; ``"none"`` runs without one) and, for a run with ``save``, store the
    result in its folder. Raises ValueError / ParamError / SuspectLoadError before any training on bad input."""
    import suspects

    p = params if isinstance(params, StressParams) else params_from(StressParams, params)
    target = resolve_target(ref, store)
    suspect = suspects.load(target.suspect)
    shown = target.run_id or ref
    ref_ref = reference if reference is not None else find_clean_reference(suspect, target.suspect)
    if ref_ref in ("none", ""):
        ref_ref = None
    trigger = suspect.trigger
    source = None
    if trigger is None:
        source = trigger_from or (DEFAULT_TRIGGER_SOURCE if str(target.suspect).startswith("demo:") else None)
        if source is None:
            raise ValueError(f"{shown} has no known trigger: adopt a recovered one (a detection scan) or pass "
                             "--trigger-from SUSPECT to borrow a trigger")
        trigger = suspects.load(source).trigger
        if trigger is None:
            raise ValueError(f"{source} has no trigger to borrow")
    same = ref_ref is not None and _same_ref(ref_ref, target.suspect)
    ref_suspect = suspects.load(ref_ref) if ref_ref is not None and not same else None
    result = stress_test(suspect, ref_suspect, p, trigger=trigger, device=device, seed=seed, progress=progress,
                         should_stop=should_stop, suspect_ref=shown, reference_ref=ref_ref,
                         reference_is_suspect=same)
    result["trigger_from"] = source
    result["run_id"] = target.run_id
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if save and target.run_dir is not None:
        write_json(target.run_dir / STRESS_FILE, result, indent=2, default=str)
    return result


def _same_ref(a: str, b: str) -> bool:
    if a == b or (bundle_name(a) or a) == (bundle_name(b) or b):  # demo:NAME and its folder are one model
        return True
    if a.startswith("demo:") or b.startswith("demo:"):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


# --- the job kind ------------------------------------------------------------------------------------------


@dataclass
class StressJob:
    id: str
    target: str
    params: dict
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
    error: str | None
    result: dict | None

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")


def _ensure_table(store: RunStore) -> None:
    with store._conn() as c:
        c.executescript(_SCHEMA)


def _job(row) -> StressJob:
    d = dict(row)
    d["params"] = json.loads(d["params"] or "{}")
    d["result"] = json.loads(d["result"]) if d["result"] else None
    d["cancel"] = bool(d["cancel"])
    return StressJob(**d)


def submit_stress(store: RunStore, run_id: str, params: dict[str, Any] | None = None, seed: int = 0,
                  device: str | None = None, start_worker: bool = True) -> str:
    """Validate and queue a stress test of a finished run for the background worker; returns the job's id."""
    from .jobs import ensure_worker

    params_from(StressParams, params)  # refuse nonsense before a row is written
    target = resolve_target(run_id, store)
    if target.run_id is None:
        raise ValueError(f"{run_id!r} is not a finished run of the store at {store.root}")
    _ensure_table(store)
    job_id = time.strftime("%Y%m%d-%H%M%S") + f"-stress-{uuid.uuid4().hex[:6]}"
    with store._conn() as c:
        c.execute("INSERT INTO stress_jobs (id, target, params, seed, device, status, created) "
                  "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                  (job_id, target.run_id, json.dumps(params or {}), int(seed), device, time.time()))
    if start_worker:
        ensure_worker(store, device)
    return job_id


def stress_job(store: RunStore, job_id: str) -> StressJob | None:
    _ensure_table(store)
    with store._conn() as c:
        row = c.execute("SELECT * FROM stress_jobs WHERE id = ?", (job_id,)).fetchone()
    return _job(row) if row else None


def latest_stress_job(store: RunStore, run_id: str) -> StressJob | None:
    """The newest stress job of a run (any status), or None."""
    _ensure_table(store)
    with store._conn() as c:
        row = c.execute("SELECT * FROM stress_jobs WHERE target = ? ORDER BY created DESC LIMIT 1",
                        (run_id,)).fetchone()
    return _job(row) if row else None


def queued_stress(store: RunStore) -> int:
    """How many stress tests wait for the worker."""
    _ensure_table(store)
    with store._conn() as c:
        return int(c.execute("SELECT COUNT(*) FROM stress_jobs WHERE status = 'queued'").fetchone()[0])


def cancel_stress(store: RunStore, job_id: str) -> None:
    """Ask a stress test to stop; a queued one is cancelled at once."""
    with store._conn() as c:
        c.execute("UPDATE stress_jobs SET cancel = 1 WHERE id = ?", (job_id,))
        c.execute("UPDATE stress_jobs SET status = 'cancelled', finished = ?, message = 'cancelled' "
                  "WHERE id = ? AND status = 'queued'", (time.time(), job_id))


def _set(store: RunStore, job_id: str, **cols: Any) -> None:
    keys = ", ".join(f"{k} = ?" for k in cols)
    with store._conn() as c:
        c.execute(f"UPDATE stress_jobs SET {keys} WHERE id = ?", (*cols.values(), job_id))


def claim_next_stress(store: RunStore, pid: int) -> StressJob | None:
    """Mark stress jobs whose process died as interrupted, then take the oldest queued one (atomically)."""
    _ensure_table(store)
    with store._conn() as c:
        for row in c.execute("SELECT id, pid FROM stress_jobs WHERE status = 'running'").fetchall():
            if not _pid_alive(row["pid"]):
                c.execute("UPDATE stress_jobs SET status = 'interrupted', finished = ?, message = 'interrupted', "
                          "error = 'the worker process ended before the stress test finished' WHERE id = ?",
                          (time.time(), row["id"]))
        c.execute("BEGIN IMMEDIATE")
        row = c.execute("SELECT id FROM stress_jobs WHERE status = 'queued' ORDER BY created LIMIT 1").fetchone()
        if row is None:
            c.execute("COMMIT")
            return None
        c.execute("UPDATE stress_jobs SET status = 'running', pid = ?, started = ?, message = 'starting' "
                  "WHERE id = ?", (pid, time.time(), row["id"]))
        c.execute("COMMIT")
    return stress_job(store, row["id"])


def execute_stress(store: RunStore, job: StressJob, device: str | None = None) -> str:
    """Run a claimed stress job to its end (the result goes into the run's folder) and return its final status."""
    last = [0.0]

    def progress(fraction: float, message: str, metrics: dict) -> None:
        now = time.time()
        if now - last[0] > 0.5 or fraction >= 1.0:
            _set(store, job.id, progress=float(fraction), message=message)
            last[0] = now

    def should_stop() -> bool:
        with store._conn() as c:
            row = c.execute("SELECT cancel FROM stress_jobs WHERE id = ?", (job.id,)).fetchone()
        return bool(row and row["cancel"])

    try:
        result = run_stress(job.target, store, job.params, device=device or job.device, seed=job.seed,
                            progress=progress, should_stop=should_stop)
        _set(store, job.id, status="finished", progress=1.0, message=f"finished: {result['verdict']}",
             finished=time.time(), result=json.dumps(result, default=str))
        return "finished"
    except Cancelled:
        _set(store, job.id, status="cancelled", message="cancelled", finished=time.time())
        return "cancelled"
    except (ParamError, ValueError) as err:
        _set(store, job.id, status="failed", message="failed", finished=time.time(), error=str(err))
        return "failed"
    except Exception as err:  # noqa: BLE001 - recorded for the user
        _set(store, job.id, status="failed", message="failed", finished=time.time(),
             error=f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        return "failed"
