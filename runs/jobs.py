"""Background jobs: defenses run in a worker subprocess, one at a time per device, from a durable queue.

``submit`` validates everything first (nonsense parameters are refused before a row is written), queues the
run in the store and makes sure a worker is running. The worker (``python -m runs.worker --runs ROOT``, see
:mod:`runs.worker`) holds a per-device lock file, takes queued runs oldest first and exits when the queue is empty. It is started in its
own session, so it survives page reloads, other tabs and a restart of the dashboard server; if it dies, the
store marks its run ``interrupted``. Cancelling sets a flag the worker checks at every progress report.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from defenses.base import Cancelled, ParamError
from defenses.registry import get_defense
from defenses.runner import parse_measure, resolve_pool_size, run_defense
from suspects.identity import fingerprint

from .store import RunStore, run_file

__all__ = ["create_run", "submit", "ensure_worker", "worker_running", "any_worker_running", "reap_workers", "device_lock", "run_queued",
           "execute"]

ROOT = Path(__file__).resolve().parent.parent

# The workers this process started, by (store root, device): at most one alive each; finished ones are reaped
# (waited for) so that none lingers as a zombie (issue 12.9).
_WORKERS: dict[tuple[str, str], subprocess.Popen] = {}
_WORKERS_LOCK = threading.Lock()


def _lock_path(store: RunStore, device: str | None) -> Path:
    return store.root / f"worker-{(device or 'auto').replace(':', '_')}.lock"


@contextlib.contextmanager
def device_lock(store: RunStore, device: str | None = None, wait: bool = True):
    """Hold the per-device lock (one defense at a time per device). Yields False when ``wait=False`` and busy."""
    path = _lock_path(store, device)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        fh.close()


def create_run(store: RunStore, defense: str, suspect_ref: str, preset: str = "quick",
               overrides: dict[str, Any] | None = None, pool_size: int | None = None, seed: int = 0,
               device: str | None = None, pid: int | None = None, measure: str = "full",
               suspect: Any = None) -> str:
    """Validate everything (parameters, suspect, threat model, pool size, ``measure``), then add the run to the store.

    Raises ParamError / ValueError / SuspectLoadError before any row is written. With ``pid`` the run is
    recorded as already running in that (foreground) process. ``measure`` (``full`` or ``subset:N``, see
    :func:`defenses.runner.run_defense`) is kept with the run's parameters as ``_measure``. ``suspect``: the suspect
    ``suspect_ref`` names, when the caller has loaded it already (not loaded again). ``pool_size`` None: the
    default (:func:`defenses.runner.resolve_pool_size`), recorded as the number it resolves to.
    """
    import suspects

    d = get_defense(defense)
    params = d.make_params(preset, overrides)
    parse_measure(measure)
    suspect = suspect if suspect is not None else suspects.load(suspect_ref)
    d.check_applicable(suspect, params)
    pool_n = len(suspect.defense_pool)
    pool_size = resolve_pool_size(pool_size, pool_n)
    if not 1 <= int(pool_size) <= pool_n:
        raise ParamError(f"pool size must lie in [1, {pool_n}] (the suspect's clean defense pool), got {pool_size}")
    extra: dict[str, Any] = {"_resolved": asdict(params)}
    if str(measure or "full").strip().lower() != "full":
        extra["_measure"] = str(measure).strip().lower()
    return store.create(defense, suspect_ref, preset, {**(overrides or {}), **extra},
                        int(pool_size), int(seed), device, pid=pid, suspect_key=fingerprint(suspect))


def submit(store: RunStore, defense: str, suspect_ref: str, preset: str = "quick",
           overrides: dict[str, Any] | None = None, pool_size: int | None = None, seed: int = 0,
           device: str | None = None, start_worker: bool = True, measure: str = "full") -> str:
    """Validate and queue a run for the background worker; returns its id."""
    run_id = create_run(store, defense, suspect_ref, preset, overrides, pool_size, seed, device, measure=measure)
    if start_worker:
        ensure_worker(store, device)
    return run_id


def reap_workers() -> int:
    """Wait for the workers this process started that have exited (no zombies); returns how many are alive."""
    with _WORKERS_LOCK:
        for key, proc in list(_WORKERS.items()):
            if proc.poll() is not None:  # poll() waits for the exited child, which removes its zombie
                del _WORKERS[key]
        return len(_WORKERS)


def any_worker_running(root: str | os.PathLike) -> bool:
    """Whether any process holds a device lock of the run store at ``root`` (a worker or a foreground ``defend``),
    without creating the store."""
    for path in Path(root).glob("worker-*.lock"):
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    return False


def worker_running(store: RunStore, device: str | None = None) -> bool:
    """Whether a worker runs for this store and device: one this process started and still alive, or any process
    holding the device lock."""
    reap_workers()
    with _WORKERS_LOCK:
        if (str(store.root), device or "auto") in _WORKERS:
            return True
    with device_lock(store, device, wait=False) as free:
        return not free


def ensure_worker(store: RunStore, device: str | None = None) -> subprocess.Popen | None:
    """Start a detached worker unless one is already running (see :func:`worker_running`); returns the new process,
    or None when none was started. Safe to call on every refresh of a page: it starts at most one per store and
    device, keeps its handle and reaps it once it exits."""
    key = (str(store.root), device or "auto")
    with _WORKERS_LOCK:
        for k, proc in list(_WORKERS.items()):
            if proc.poll() is not None:
                del _WORKERS[k]
        if key in _WORKERS:
            return None
        with device_lock(store, device, wait=False) as free:
            if not free:
                return None
        cmd = [sys.executable, "-m", "runs.worker", "--runs", str(store.root)]
        if device:
            cmd += ["--device", device]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(store.root / "worker.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(ROOT), env=env, start_new_session=True)
        _WORKERS[key] = proc
        return proc


def _new_phase(previous: str, message: str) -> bool:
    """Whether ``message`` starts a new phase of the run ("measuring after: ..." after "step 70/70"): such a message
    is always recorded, so a page never sits at the last step while the run does something else (issue 27.8)."""
    return re.sub(r"[\d.,]+", "#", previous) != re.sub(r"[\d.,]+", "#", message)


def execute(store: RunStore, run_id: str, device: str | None = None, progress_hook=None, suspect: Any = None) -> str:
    """Run one claimed run to its end, recording progress, and return its final status. ``suspect``: the run's
    suspect when the caller has loaded it already (a foreground run), else it is loaded here."""
    import suspects

    rec = store.get(run_id)
    log = io.StringIO()
    last = [0.0]
    phase = [""]

    def progress(fraction: float, message: str, metrics: dict) -> None:
        now = time.time()
        if metrics or now - last[0] > 0.5 or fraction >= 1.0 or _new_phase(phase[0], message):
            store.update_progress(run_id, fraction, message, metrics)
            last[0], phase[0] = now, message
            log.write(f"{time.strftime('%H:%M:%S')} {100 * fraction:5.1f}% {message} {metrics}\n")
        if progress_hook is not None:
            progress_hook(fraction, message, metrics)

    try:
        if suspect is None:
            suspect = suspects.load(rec.suspect)
        overrides = {k: v for k, v in rec.params.items() if not k.startswith("_")}
        for key, filename in get_defense(rec.defense).run_files.items():  # an earlier run, by id: pass its file
            if str(overrides.get(key) or "").strip():
                overrides[key] = str(run_file(str(overrides[key]), filename, root=store.root))
        report = run_defense(rec.defense, suspect, rec.preset, overrides, progress=progress,
                             should_stop=lambda: store.cancel_requested(run_id), pool_size=rec.pool_size,
                             seed=rec.seed, device=device or rec.device, suspect_ref=rec.suspect,
                             artifacts_dir=store.artifacts_dir(run_id),
                             measure=str(rec.params.get("_measure") or "full"))
        store.finish(run_id, dict(report), report.suspect, log.getvalue())
        return "finished"
    except Cancelled:
        store.fail(run_id, "cancelled by the user", status="cancelled")
        return "cancelled"
    except Exception as err:  # noqa: BLE001 - recorded for the user
        store.fail(run_id, f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        return "failed"


def run_queued(store: RunStore, device: str | None = None) -> int:
    """Worker loop: take queued runs, then queued stress tests (:mod:`runs.stress`), until none is left. Returns
    how many ran."""
    n = 0
    with device_lock(store, device, wait=False) as free:
        if not free:
            return 0
        while True:
            store.reconcile()
            rec = store.claim_next(os.getpid())
            if rec is None:  # then the queued stress tests (runs.stress), one at a time as well
                from .stress import claim_next_stress, execute_stress

                job = claim_next_stress(store, os.getpid())
                if job is None:
                    return n
                execute_stress(store, job, device)
            else:
                execute(store, rec.id, device)
            n += 1
