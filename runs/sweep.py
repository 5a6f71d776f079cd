"""Sweeps: a grid of defense runs (defenses x suspects x presets x seeds) executed by Ray.

- :class:`SweepSpec` is the grid (from CLI flags, a TOML file or the Compare page); :meth:`SweepSpec.cells`
  expands it into :class:`Cell` s, each keyed by a hash of (suspect fingerprint, defense, preset, overrides,
  pool size, seed), so the same cell is recognised in any later sweep.
- :func:`run_sweep` is the driver. Each cell is one Ray task (``num_cpus`` per task, torch's threads set to match;
  ``num_gpus=1`` when the cluster has GPUs). Workers never touch the run store: the suspect reaches them through
  Ray's object store (or by its path, when the cluster shares it), a task returns the report, the repaired
  model and the files its defense kept, and the driver writes the run folder and its row with
  :meth:`runs.store.RunStore.finish` (atomic, as every run). A sweep has an id (a hash of its grid) and a row in the
  store (table ``sweeps``, its cells in ``sweep_cells``): running it again skips finished cells; a task whose
  worker dies, or that raises, is retried ``max_retries`` times and then recorded as failed with its error while
  the others go on; Ctrl-C (or a cancel from the page) cancels the remaining tasks and writes nothing half-done.
- :func:`submit_sweep` queues a sweep for the background worker (:mod:`runs.worker`), which calls
  :func:`run_queued_sweeps`.

Ray: https://docs.ray.io (tasks, ``max_retries``, ``retry_exceptions``, ``ray.cancel``).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from defenses.base import ParamError
from defenses.registry import get_defense, list_defenses
from defenses.runner import resolve_pool_size
from suspects.identity import fingerprint as identity_fingerprint
from suspects.store import Suspect

from .store import RunStore, _pid_alive, run_file

__all__ = ["SweepSpec", "Cell", "SweepRecord", "SweepResult", "run_sweep", "submit_sweep", "run_queued_sweeps",
           "list_sweeps", "get_sweep", "sweep_cells", "cancel_sweep", "suspect_fingerprint", "CRASH_ENV", "queued_sweeps",
           "parse_sets"]

# Fault injection for the tests: when the file this variable names exists, the next task to start deletes it and
# kills its own worker process (``os._exit``), as a crashed or pre-empted worker would.
CRASH_ENV = "BACKDOOR_LENS_SWEEP_CRASH_ONCE"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    suspects TEXT NOT NULL,
    status TEXT NOT NULL,
    total INTEGER DEFAULT 0,
    done INTEGER DEFAULT 0,
    failed INTEGER DEFAULT 0,
    skipped INTEGER DEFAULT 0,
    options TEXT,
    created REAL,
    started REAL,
    finished REAL,
    pid INTEGER,
    cancel INTEGER DEFAULT 0,
    error TEXT
);
CREATE TABLE IF NOT EXISTS sweep_cells (
    sweep_id TEXT NOT NULL,
    key TEXT NOT NULL,
    suspect TEXT NOT NULL,
    defense TEXT NOT NULL,
    preset TEXT NOT NULL,
    overrides TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    run_id TEXT,
    error TEXT,
    updated REAL,
    PRIMARY KEY (sweep_id, key)
);
CREATE INDEX IF NOT EXISTS sweep_cells_key ON sweep_cells(key);
"""

SWEEP_STATUSES = ("queued", "running", "finished", "cancelled", "interrupted", "failed")


# --- the grid ----------------------------------------------------------------------------------------------


def _seed_list(seeds: int | Iterable[int] | None) -> list[int]:
    if seeds is None:
        return [0]
    if isinstance(seeds, int):
        if seeds < 1:
            raise ParamError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ParamError("the seed list is empty")
    return list(dict.fromkeys(out))


def _names(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if str(s).strip()]


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``defense.name=value`` lines (values parsed as JSON when they can be) into a dict; ParamError otherwise."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ParamError(f"expected defense.name=value, got {item!r}")
        key, value = (x.strip() for x in item.split("=", 1))
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@dataclass
class Cell:
    """One run of the grid."""

    suspect: str
    defense: str
    preset: str
    overrides: dict[str, Any]
    seed: int
    pool_size: int | None
    key: str = ""

    def label(self) -> str:
        sets = ", ".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))
        return f"{self.defense}/{self.preset}{' (' + sets + ')' if sets else ''} seed {self.seed} on {self.suspect}"


@dataclass
class SweepSpec:
    """A grid: every defense x suspect x preset x seed, with per-defense parameter overrides.

    ``overrides`` maps a defense name to ``{parameter: value}`` (CLI ``--set defense.name=value``); a defense
    without an entry runs its preset unchanged.
    """

    defenses: list[str]
    suspects: list[str]
    presets: list[str] = field(default_factory=lambda: ["quick"])
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    pool_size: int | None = None  # None: each suspect's default (defenses.runner.resolve_pool_size)

    @classmethod
    def build(cls, defenses: str | Iterable[str], suspects: str | Iterable[str],
              presets: str | Iterable[str] | None = None, seeds: int | Iterable[int] | None = None,
              overrides: dict[str, dict[str, Any]] | None = None, sets: dict[str, Any] | None = None,
              pool_size: int | None = None) -> SweepSpec:
        """Normalise and check a grid. ``defenses`` may be ``"all"``; ``sets`` holds ``defense.name`` -> value."""
        names = _names(defenses)
        if names == ["all"]:
            names = list_defenses()
        for d in names:
            get_defense(d)  # unknown names fail here
        sus = _names(suspects)
        if not names or not sus:
            raise ParamError("a sweep needs at least one defense and one suspect")
        ov: dict[str, dict[str, Any]] = {d: dict(v) for d, v in (overrides or {}).items()}
        for key, value in (sets or {}).items():
            if "." not in key:
                raise ParamError(f"--set in a sweep names its defense: defense.name=value (got {key!r})")
            d, _, p = key.partition(".")
            ov.setdefault(d, {})[p.replace("-", "_")] = value
        stray = sorted(set(ov) - set(names))
        if stray:
            raise ParamError(f"overrides for defense(s) not in the sweep: {', '.join(stray)}")
        if pool_size is not None and int(pool_size) < 1:
            raise ParamError(f"pool size must be >= 1, got {pool_size}")
        return cls(names, sus, _names(presets) or ["quick"], _seed_list(seeds), ov,
                   None if pool_size is None else int(pool_size))

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> SweepSpec:
        """A grid file::

            defenses = ["finetune", "linf_prune"]   # or "all"
            suspects = ["demo:badnets"]
            presets = ["quick"]
            seeds = 3                                # or [0, 7, 11]
            pool_size = 200
            [set.finetune]
            epochs = 1
        """
        import tomllib

        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ParamError(f"cannot read the sweep file {path}: {err}") from err
        unknown = sorted(set(data) - {"defenses", "suspects", "presets", "seeds", "seed_list", "pool_size", "set"})
        if unknown:
            raise ParamError(f"{path}: unknown field(s) {', '.join(unknown)}")
        seeds = data.get("seed_list", data.get("seeds"))
        return cls.build(data.get("defenses", []), data.get("suspects", []), data.get("presets"), seeds,
                         overrides=data.get("set"), pool_size=data.get("pool_size"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        return cls(list(d["defenses"]), list(d["suspects"]), list(d["presets"]), [int(s) for s in d["seeds"]],
                   {k: dict(v) for k, v in d.get("overrides", {}).items()}, d.get("pool_size"))

    @property
    def id(self) -> str:
        """``sweep-<hash of the grid>``: the same grid always has the same id."""
        canon = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return "sweep-" + hashlib.sha256(canon.encode()).hexdigest()[:12]

    def size(self) -> int:
        return len(self.defenses) * len(self.suspects) * len(self.presets) * len(self.seeds)

    def cells(self, fingerprints: dict[str, str] | None = None,
              pool_sizes: dict[str, int] | None = None) -> list[Cell]:
        """Every cell, suspect-major; keys use ``fingerprints`` (suspect ref -> :func:`suspect_fingerprint`);
        ``pool_sizes`` (suspect ref -> its clean pool's size) resolves the default pool size per suspect."""
        fp = fingerprints or {}
        sizes = pool_sizes or {}
        out = []
        for s in self.suspects:
            for d in self.defenses:
                for p in self.presets:
                    for seed in self.seeds:
                        pool = (resolve_pool_size(self.pool_size, sizes[s]) if s in sizes else self.pool_size)
                        c = Cell(s, d, p, dict(self.overrides.get(d, {})), int(seed), pool)
                        c.key = cell_key(fp.get(s, s), c)
                        out.append(c)
        return out


def suspect_fingerprint(suspect: Suspect) -> str:
    """sha256 of the suspect's card (its data, trigger and architecture) and weights."""
    h = hashlib.sha256()
    card = {k: v for k, v in suspect.card.items() if k not in ("created", "versions")}
    h.update(json.dumps(card, sort_keys=True, default=str).encode())
    if suspect._trigger_override is not None:
        h.update(repr(suspect._trigger_override).encode())
    for name, t in sorted(suspect.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cell_key(fingerprint: str, cell: Cell) -> str:
    canon = json.dumps([fingerprint, cell.defense, cell.preset, cell.overrides, cell.pool_size, cell.seed],
                       sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:20]


# --- the sweep's rows in the store ----------------------------------------------------------------------------


@dataclass
class SweepRecord:
    id: str
    spec: dict
    suspects: list[str]
    status: str
    total: int
    done: int
    failed: int
    skipped: int
    options: dict
    created: float
    started: float | None
    finished: float | None
    pid: int | None
    cancel: bool
    error: str | None

    @property
    def progress(self) -> float:
        return (self.done + self.failed + self.skipped) / self.total if self.total else 0.0

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")


def _init(store: RunStore) -> RunStore:
    with store._conn() as c:
        c.executescript(_SCHEMA)
    return store


def _record(row: Any) -> SweepRecord:
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    d["suspects"] = json.loads(d["suspects"])
    d["options"] = json.loads(d["options"] or "{}")
    d["cancel"] = bool(d["cancel"])
    return SweepRecord(**d)


def get_sweep(store: RunStore, sweep_id: str) -> SweepRecord | None:
    with _init(store)._conn() as c:
        row = c.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
    return _record(row) if row else None


def list_sweeps(store: RunStore, suspect: str | None = None) -> list[SweepRecord]:
    """Every sweep, newest first (those naming ``suspect`` only, when given); dead running ones -> interrupted."""
    from .compare import same_suspect

    with _init(store)._conn() as c:
        rows = c.execute("SELECT * FROM sweeps ORDER BY created DESC").fetchall()
    out = []
    for row in rows:
        rec = _record(row)
        if rec.status == "running" and not _pid_alive(rec.pid):
            _set_status(store, rec.id, "interrupted", "the sweep's driver ended before the sweep finished")
            rec.status = "interrupted"
        if suspect is None or any(same_suspect(s, suspect) for s in rec.suspects):
            out.append(rec)
    return out


def sweep_cells(store: RunStore, sweep_id: str) -> list[dict]:
    with _init(store)._conn() as c:
        rows = c.execute("SELECT * FROM sweep_cells WHERE sweep_id = ? ORDER BY rowid", (sweep_id,)).fetchall()
    return [{**dict(r), "overrides": json.loads(r["overrides"])} for r in rows]


def cancel_sweep(store: RunStore, sweep_id: str) -> None:
    """Ask a sweep to stop (its driver cancels the remaining tasks); a queued sweep is cancelled at once."""
    with _init(store)._conn() as c:
        c.execute("UPDATE sweeps SET cancel = 1 WHERE id = ?", (sweep_id,))
        c.execute("UPDATE sweeps SET status = 'cancelled', finished = ? WHERE id = ? AND status = 'queued'",
                  (time.time(), sweep_id))


def _cancel_requested(store: RunStore, sweep_id: str) -> bool:
    with store._conn() as c:
        row = c.execute("SELECT cancel FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
    return bool(row and row["cancel"])


def _set_status(store: RunStore, sweep_id: str, status: str, error: str | None = None) -> None:
    ended = time.time() if status not in ("queued", "running") else None
    with store._conn() as c:
        c.execute("UPDATE sweeps SET status = ?, error = COALESCE(?, error), finished = ? WHERE id = ?",
                  (status, error, ended, sweep_id))


def _upsert_sweep(store: RunStore, spec: SweepSpec, status: str, options: dict, pid: int | None) -> str:
    sid = spec.id
    now = time.time()
    current = get_sweep(store, sid)
    if current is not None and current.status == "running" and _pid_alive(current.pid) and current.pid != pid:
        raise ValueError(f"sweep {sid} is already running (process {current.pid})")
    with _init(store)._conn() as c:
        c.execute("INSERT INTO sweeps (id, spec, suspects, status, total, options, created) VALUES (?, ?, ?, ?, ?, ?, ?) "
                  "ON CONFLICT(id) DO NOTHING",
                  (sid, json.dumps(spec.to_dict(), default=str), json.dumps(spec.suspects), status, spec.size(),
                   json.dumps(options), now))
        c.execute("UPDATE sweeps SET status = ?, total = ?, options = ?, pid = ?, cancel = 0, error = NULL, "
                  "started = ?, finished = NULL, done = 0, failed = 0, skipped = 0 WHERE id = ?",
                  (status, spec.size(), json.dumps(options), pid, now if status == "running" else None, sid))
    return sid


def _set_cell(store: RunStore, sweep_id: str, cell: Cell, status: str, run_id: str | None = None,
              error: str | None = None) -> None:
    with store._conn() as c:
        c.execute("INSERT INTO sweep_cells (sweep_id, key, suspect, defense, preset, overrides, seed, status, run_id, "
                  "error, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sweep_id, key) DO UPDATE SET "
                  "status = excluded.status, run_id = excluded.run_id, error = excluded.error, "
                  "updated = excluded.updated",
                  (sweep_id, cell.key, cell.suspect, cell.defense, cell.preset,
                   json.dumps(cell.overrides, sort_keys=True, default=str), cell.seed, status, run_id, error,
                   time.time()))
        column = {"finished": "done", "failed": "failed", "skipped": "skipped"}.get(status)
        if column:
            c.execute(f"UPDATE sweeps SET {column} = {column} + 1 WHERE id = ?", (sweep_id,))


def _finished_run(store: RunStore, key: str) -> str | None:
    """The id of a finished run already made for cell ``key`` (by any sweep), if its folder still exists."""
    with store._conn() as c:
        rows = c.execute("SELECT sc.run_id FROM sweep_cells sc JOIN runs r ON r.id = sc.run_id WHERE sc.key = ? "
                         "AND sc.status IN ('finished', 'skipped') AND r.status = 'finished'", (key,)).fetchall()
    for row in rows:
        rec = store.get(row["run_id"])
        if rec is not None and rec.run_dir and (Path(rec.run_dir) / "report.json").is_file():
            return rec.id
    return None


# --- the Ray task --------------------------------------------------------------------------------------------


def _crash_if_asked() -> None:
    marker = os.environ.get(CRASH_ENV)
    if marker:
        try:
            os.remove(marker)
        except FileNotFoundError:
            return
        os._exit(1)


def _cell_task(suspect: Suspect | str, cell: dict[str, Any], device: str | None, threads: int) -> dict[str, Any]:
    """Run one cell on a Ray worker and return its report, repaired model and kept files (no store access).

    ``suspect`` is the suspect itself (from the object store) or a reference every worker can load (a shared path).
    """
    from defenses.runner import run_defense

    torch.set_num_threads(max(1, int(threads)))
    _crash_if_asked()
    if isinstance(suspect, str):
        import suspects as _suspects

        suspect = _suspects.load(suspect)
    log = io.StringIO()

    def progress(fraction: float, message: str, metrics: dict) -> None:
        if metrics or fraction >= 1.0:
            log.write(f"{time.strftime('%H:%M:%S')} {100 * fraction:5.1f}% {message} {metrics}\n")

    with tempfile.TemporaryDirectory(prefix="lens-cell-") as tmp:
        artifacts = Path(tmp) / "artifacts"
        report = run_defense(cell["defense"], suspect, cell["preset"], dict(cell["overrides"]), progress=progress,
                             pool_size=int(cell["pool_size"]), seed=int(cell["seed"]), device=device,
                             suspect_ref=cell["suspect"], artifacts_dir=artifacts)
        files = ({p.name: p.read_bytes() for p in sorted(artifacts.iterdir()) if p.is_file()}
                 if artifacts.is_dir() else {})
    return {"report": dict(report), "model": report.suspect.model, "card": report.suspect.card, "files": files,
            "log": log.getvalue(), "pid": os.getpid()}


# --- the driver ----------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: cell key -> run id (finished, including skipped ones) or ``label: error``
    (failed)."""

    sweep_id: str
    total: int
    runs: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    status: str = "finished"
    seconds: float = 0.0


Progress = Callable[[int, int, Cell, str], None]


def _load_suspects(refs: list[str]) -> dict[str, Suspect]:
    import suspects as _suspects

    return {ref: _suspects.load(ref) for ref in refs}


def _check_cell(cell: Cell, suspect: Suspect, run_roots: Path) -> dict[str, Any]:
    """Validate a cell as ``defend`` would (parameters, threat model, pool size); returns its resolved overrides."""
    d = get_defense(cell.defense)
    params = d.make_params(cell.preset, cell.overrides)
    d.check_applicable(suspect, params)
    n = len(suspect.defense_pool)
    if not 1 <= cell.pool_size <= n:
        raise ParamError(f"pool size must lie in [1, {n}] (the suspect's clean defense pool), got {cell.pool_size}")
    overrides = dict(cell.overrides)
    for key, filename in d.run_files.items():  # an earlier run, by id: pass its file (driver-side path)
        if str(overrides.get(key) or "").strip():
            overrides[key] = str(run_file(str(overrides[key]), filename, root=run_roots))
    return overrides


def _ray_init(address: str | None, cpus: int | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (and so shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = int(cpus) if cpus else (os.cpu_count() or 1)
    saved = os.environ.get("PYTHONPATH")
    if not address:  # local workers import this checkout, as the driver does
        root = str(Path(__file__).resolve().parent.parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, saved or "") if p)
    try:
        ray.init(**kwargs)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return True


def run_sweep(spec: SweepSpec, store: RunStore, *, address: str | None = None, cpus: int | None = None,
              task_cpus: float = 1, gpus: bool | None = None, shared_paths: bool = False, max_retries: int = 1,
              progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
              on_start: Callable[[int, int], None] | None = None) -> SweepResult:
    """Run every cell of ``spec`` not finished yet on Ray and write each finished one to ``store``.

    ``address``: None starts a local Ray with ``cpus`` CPUs (default: the machine's), ``"auto"`` or
    ``"ray://HOST:PORT"`` joins a cluster (an already initialised Ray is used as is). Each task asks for
    ``task_cpus`` CPUs and, when ``gpus`` (default: the cluster has GPUs), one GPU. ``shared_paths``: workers load
    suspects from their references (a disk the cluster shares) instead of the object store. A task is retried
    ``max_retries`` times (worker death or an error), then its cell is recorded as failed. ``on_start(total,
    to_run)`` is called once the grid is expanded; ``progress(done, to_run, cell, status)`` after each cell.
    KeyboardInterrupt cancels the remaining tasks, marks the sweep cancelled and is re-raised.
    """
    import ray

    t0 = time.time()
    _init(store)
    options = {"address": address, "cpus": cpus, "task_cpus": task_cpus, "shared_paths": shared_paths,
               "max_retries": max_retries}
    sid = _upsert_sweep(store, spec, "running", options, os.getpid())
    result = SweepResult(sid, spec.size())
    stop = should_stop or (lambda: _cancel_requested(store, sid))
    try:
        loaded = _load_suspects(spec.suspects)
    except Exception as err:
        _set_status(store, sid, "failed", f"{type(err).__name__}: {err}")
        raise
    prints = {ref: suspect_fingerprint(s) for ref, s in loaded.items()}
    todo: list[tuple[Cell, dict[str, Any]]] = []
    for cell in spec.cells(prints, {ref: len(s.defense_pool) for ref, s in loaded.items()}):
        done_run = _finished_run(store, cell.key)
        if done_run is not None:
            _set_cell(store, sid, cell, "skipped", run_id=done_run)
            result.skipped.append(cell.key)
            result.runs[cell.key] = done_run
            continue
        try:
            todo.append((cell, _check_cell(cell, loaded[cell.suspect], store.root)))
        except (ValueError, KeyError) as err:  # ParamError is a ValueError
            _set_cell(store, sid, cell, "failed", error=f"{type(err).__name__}: {err}")
            result.failed[cell.key] = f"{cell.label()}: {type(err).__name__}: {err}"
        else:
            _set_cell(store, sid, cell, "pending")
    if on_start is not None:
        on_start(spec.size(), len(todo))
    started_ray = False
    pending: dict[Any, Cell] = {}
    finished = 0
    try:
        if todo:
            started_ray = _ray_init(address, cpus)
            use_gpu = gpus if gpus is not None else ray.cluster_resources().get("GPU", 0) > 0
            device = "cuda" if use_gpu else "cpu"
            threads = max(1, int(task_cpus))
            payload: dict[str, Any] = {}
            for ref, s in loaded.items():
                payload[ref] = ref if shared_paths else ray.put(s)
            remote = ray.remote(_cell_task).options(num_cpus=task_cpus, num_gpus=1 if use_gpu else 0,
                                                    max_retries=max_retries, retry_exceptions=True,
                                                    name="backdoor-lens-cell")
            for cell, overrides in todo:
                job = {"suspect": cell.suspect, "defense": cell.defense, "preset": cell.preset,
                       "overrides": overrides, "seed": cell.seed, "pool_size": cell.pool_size}
                pending[remote.remote(payload[cell.suspect], job, device, threads)] = cell
        while pending:
            if stop():
                raise KeyboardInterrupt("sweep cancelled")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a failed cell is recorded, the others go on
                    cause = getattr(err, "cause", None) or err
                    error = f"{type(cause).__name__}: {cause}"
                    _set_cell(store, sid, cell, "failed", error=error[:4000])
                    result.failed[cell.key] = f"{cell.label()}: {error}"
                    status = "failed"
                else:
                    run_id = _write_run(store, sid, cell, out, loaded[cell.suspect])
                    _set_cell(store, sid, cell, "finished", run_id=run_id)
                    result.runs[cell.key] = run_id
                    status = "finished"
                finished += 1
                if progress is not None:
                    progress(finished, len(todo), cell, status)
    except BaseException as err:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort
                pass
        cancelled = isinstance(err, KeyboardInterrupt)
        _set_status(store, sid, "cancelled" if cancelled else "failed",
                    "cancelled by the user" if cancelled else f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        result.status = "cancelled" if cancelled else "failed"
        if started_ray:
            ray.shutdown()
        raise
    if started_ray:
        ray.shutdown()
    result.seconds = time.time() - t0
    _set_status(store, sid, "finished", f"{len(result.failed)} cell(s) failed" if result.failed else None)
    return result


def _write_run(store: RunStore, sweep_id: str, cell: Cell, out: dict[str, Any], parent: Suspect) -> str:
    """Record one finished cell as a run: its row, then its folder atomically (as ``defend`` does)."""
    report = out["report"]
    params = {**cell.overrides, "_resolved": report.get("params", {}), "_sweep": sweep_id, "_cell": cell.key}
    run_id = store.create(cell.defense, cell.suspect, cell.preset, params, cell.pool_size, cell.seed,
                          report.get("device"), pid=os.getpid(), suspect_key=identity_fingerprint(parent))
    try:
        kept = store.artifacts_dir(run_id)
        if out["files"]:
            kept.mkdir(parents=True, exist_ok=True)
            for name, data in out["files"].items():
                (kept / Path(name).name).write_bytes(data)
        repaired = Suspect(out["model"], copy.deepcopy(out["card"]), None, _plan=parent._plan,
                           _trigger_override=parent._trigger_override)
        store.finish(run_id, report, repaired, out.get("log", ""))
    except BaseException as err:
        store.fail(run_id, f"{type(err).__name__}: {err}",
                   status="cancelled" if isinstance(err, KeyboardInterrupt) else "failed")
        raise
    return run_id


# --- the background queue ------------------------------------------------------------------------------------


def submit_sweep(store: RunStore, spec: SweepSpec, *, cpus: int | None = None, task_cpus: float = 1,
                 address: str | None = None, start_worker: bool = True) -> str:
    """Queue a sweep for the background worker (the Compare page's "start a sweep"); returns its id."""
    loaded = _load_suspects(spec.suspects)  # bad references fail here, before anything is queued
    del loaded
    options = {"address": address, "cpus": cpus, "task_cpus": task_cpus}
    sid = _upsert_sweep(store, spec, "queued", options, None)
    if start_worker:
        from .jobs import ensure_worker

        ensure_worker(store)
    return sid


def _claim_sweep(store: RunStore) -> SweepRecord | None:
    with _init(store)._conn() as c:
        c.execute("BEGIN IMMEDIATE")
        row = c.execute("SELECT id FROM sweeps WHERE status = 'queued' ORDER BY created LIMIT 1").fetchone()
        if row is not None:
            c.execute("UPDATE sweeps SET status = 'running', pid = ? WHERE id = ?", (os.getpid(), row["id"]))
        c.execute("COMMIT")
    return get_sweep(store, row["id"]) if row is not None else None


def queued_sweeps(store: RunStore) -> int:
    with _init(store)._conn() as c:
        return int(c.execute("SELECT COUNT(*) FROM sweeps WHERE status = 'queued'").fetchone()[0])


def run_queued_sweeps(store: RunStore) -> int:
    """Worker loop for sweeps: run queued sweeps until none is left; returns how many ran."""
    n = 0
    while True:
        rec = _claim_sweep(store)
        if rec is None:
            return n
        opts = rec.options
        try:
            run_sweep(SweepSpec.from_dict(rec.spec), store, address=opts.get("address"), cpus=opts.get("cpus"),
                      task_cpus=opts.get("task_cpus", 1))
        except KeyboardInterrupt:
            pass  # cancelled from the page: recorded by run_sweep
        except Exception:  # noqa: BLE001 - recorded by run_sweep; the worker goes on
            pass
        n += 1
