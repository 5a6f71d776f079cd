"""Run a defense on a suspect: build its clean pool, measure before and after, write the report.

The defense sees only the suspect's *defense pool* (clean training images, never poisoned, disjoint from
the test split), split into a part it trains on and a held-out part its stopping and selection rules may
use. BA / ASR / RA before and after are measured on the test split for the report only.

"Before" is not measured again when the suspect's card holds metrics for exactly these weights and this test split
and trigger (:func:`suspects.metrics.stored_metrics`); "after" is measured on the whole test split (``measure="full"``,
the CLI's and the benchmarks' default) or, for a live run, on N random test images (``measure="subset:N"``), with
a 95% Wilson interval beside each rate either way (issue 17.4).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from suspects.device import (
    describe_device,
    deterministic,
    deterministic_requested,
    machine_info,
    pick_device,
    prepare_model,
)
from suspects.metrics import (
    Metrics,
    der,
    evaluate,
    evaluate_subset,
    metric_definitions,
    stamp_metrics,
    stored_metrics,
    wilson_interval,
)
from suspects.store import Suspect, without_test_split
from suspects.training import seed_everything

from .base import Defense, ParamError
from .context import Cancelled, DefensePool, Progress, RepairContext
from .registry import get_defense

__all__ = ["defense_pool", "run_defense", "DefenseRun", "parse_measure", "resolve_pool_size", "held_out_count",
           "DEFAULT_POOL_SIZE", "HELD_OUT_FRACTION"]

FULL_SPLIT = "the whole test split"


DEFAULT_POOL_SIZE = 1000  # clean pool images a defense gets by default (fewer when the suspect's pool is smaller) ...
HELD_OUT_FRACTION = 0.3  # ... of which this share is held out for stopping and selection rules (300 of 1,000)


def held_out_count(n: int, val_fraction: float = HELD_OUT_FRACTION) -> int:
    """How many of ``n`` pool images are held out (none for a pool under 10 images)."""
    return int(round(n * val_fraction)) if n >= 10 else 0


def resolve_pool_size(pool_size: int | None, pool_n: int) -> int:
    """The pool size a run uses: ``pool_size`` as given, or by default the suspect's whole clean pool up to
    ``DEFAULT_POOL_SIZE`` images (the demo bundle's pool: 1,000 images, 300 of them held out)."""
    return min(DEFAULT_POOL_SIZE, int(pool_n)) if pool_size is None else int(pool_size)


AUTO_FULL_LIMIT = 5000  # ``measure="auto"``: the whole test split up to this many images ...
AUTO_SUBSET = 2000  # ... else this many random ones (with 95% intervals)


def parse_measure(measure: str | None, n_test: int | None = None) -> int | None:
    """``"full"`` (or None) -> None (the whole test split); ``"subset:N"`` -> N (N random test images, N >= 1);
    ``"auto"`` -> the whole split when it has at most ``AUTO_FULL_LIMIT`` images (or ``n_test`` is unknown), else
    ``AUTO_SUBSET`` random images: a live run on a full-size test split answers in seconds, with its interval."""
    text = str(measure or "full").strip().lower()
    if text == "full":
        return None
    if text == "auto":
        return AUTO_SUBSET if n_test is not None and n_test > AUTO_FULL_LIMIT else None
    if text.startswith("subset:"):
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    raise ParamError(f"measure must be 'full', 'auto' or 'subset:N' with N >= 1, got {measure!r}")


def intervals(m: Metrics) -> dict[str, list[float] | None]:
    """95% Wilson intervals of BA (on ``n_clean`` images) and ASR / RA (on ``n_poisoned``)."""
    out: dict[str, list[float] | None] = {}
    for key, n in (("ba", m.n_clean), ("asr", m.n_poisoned), ("ra", m.n_poisoned)):
        ci = wilson_interval(getattr(m, key), n)
        out[key] = None if ci is None else [round(ci[0], 4), round(ci[1], 4)]
    return out


def defense_pool(suspect: Suspect, n: int | None = None, val_fraction: float = HELD_OUT_FRACTION,
                 seed: int = 0) -> DefensePool:
    """``n`` clean pool images (default :func:`resolve_pool_size`) as ``x``/``y`` (train part) and
    ``x_val``/``y_val`` (held-out part: ``val_fraction`` of them)."""
    pool = suspect.defense_pool
    n = resolve_pool_size(n, len(pool))
    if n < 1:
        raise ParamError(f"pool size must be >= 1, got {n}")
    if n > len(pool):
        raise ParamError(f"pool size {n} exceeds the suspect's clean defense pool ({len(pool)} images)")
    gen = torch.Generator().manual_seed(int(seed) + 17)
    idx = torch.randperm(len(pool), generator=gen)[:n]
    n_val = held_out_count(n, val_fraction)
    val, train = idx[:n_val], idx[n_val:]
    return DefensePool(pool.images(train), pool.labels[train], pool.images(val), pool.labels[val], idx.clone())


class DefenseRun(dict):
    """The report: a plain dict (JSON-able) with the repaired suspect attached as ``.suspect`` and the run's
    artifacts folder (the files the defense kept, listed under ``files``) as ``.artifacts_dir``."""

    suspect: Suspect
    artifacts_dir: Path | None


def run_defense(name: str, suspect: Suspect, preset: str = "quick", overrides: dict[str, Any] | None = None,
                progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                pool_size: int | None = None, seed: int = 0, device: str | torch.device | None = None,
                suspect_ref: str | None = None, artifacts_dir: Path | None = None,
                measure: str = "full") -> DefenseRun:
    """Validate, run and measure a defense. Raises ParamError / ValueError before anything runs on bad input.

    ``measure``: ``"full"`` measures "after" on the whole test split; ``"subset:N"`` on N random test images
    (faster, for live runs; the report states it and gives the 95% intervals); ``"auto"`` chooses between them by
    the split's size (:func:`parse_measure`).

    ``artifacts_dir``: a folder this run owns, where a defense keeps files (``ctx.artifacts``; e.g. DBD's stage-1
    backbone). The caller decides what becomes of it (the job queue moves it into the finished run's folder);
    without one, nothing is kept on disk.
    """
    defense: Defense = get_defense(name)
    params = defense.make_params(preset, overrides)
    defense.check_applicable(suspect, params)
    subset = parse_measure(measure, len(suspect.test))
    report_progress = progress or (lambda f, m, d: None)
    stop = should_stop or (lambda: False)
    device = pick_device(str(device) if device is not None else None)
    seed_everything(seed)
    t0 = time.time()
    pool_size = resolve_pool_size(pool_size, len(suspect.defense_pool))
    pool = defense_pool(suspect, pool_size, seed=seed)
    report_progress(0.0, "measuring the suspect", {})
    trigger = suspect.trigger
    before = stored_metrics(suspect.card, suspect.model, suspect.test, trigger)
    before_source = "card" if before is not None else "measured"
    model = prepare_model(copy.deepcopy(suspect.model), device).eval()
    if before is None:
        before = evaluate(model, suspect.test, trigger, device=device)
    if stop():
        raise Cancelled("cancelled before the defense started")

    def scaled(fraction: float, message: str, metrics: dict) -> None:
        report_progress(0.02 + 0.93 * min(max(fraction, 0.0), 1.0), message, metrics)

    artifacts = Path(artifacts_dir) if artifacts_dir is not None else None
    sealed = without_test_split(suspect)  # the defense never sees a test image
    ctx = RepairContext(sealed, pool, device, seed=seed, artifacts=artifacts, progress=scaled, should_stop=stop)
    # BACKDOOR_LENS_DETERMINISTIC=1: deterministic kernels for the repair (no change on the CPU; see
    # suspects.device.deterministic); the machine record says whether they were on
    with deterministic() if deterministic_requested() else contextlib.nullcontext():
        out = defense.repair(model, params, ctx)
        machine = machine_info(device)
    repaired = out.model.eval()
    n_after = len(suspect.test) if subset is None else min(subset, len(suspect.test))
    report_progress(0.96, f"measuring after: the repaired model on {n_after:,} test images"
                          + (" and their triggered copies" if trigger is not None else ""), {})
    if subset is None:
        after = evaluate(repaired, suspect.test, trigger, device=device)
    else:
        after = evaluate_subset(repaired, suspect.test, trigger, subset, seed=seed, device=device)
    measured_on = FULL_SPLIT if subset is None or subset >= len(suspect.test) else \
        f"{after.n_clean} random images of the test split"
    seconds = time.time() - t0
    repaired = repaired.cpu().to(memory_format=torch.contiguous_format)
    for q in repaired.parameters():  # a defense may have frozen weights (NPD, ANP): the result is a plain model
        q.requires_grad_(True)
    report = DefenseRun({
        "defense": name,
        "title": defense.title,
        "paper": defense.paper,
        "suspect": suspect_ref or suspect.name,
        "preset": preset,
        "params": asdict(params),
        "pool_size": pool_size,
        "pool_split": {"train": pool.n_train, "held_out": pool.n_held_out},
        "seed": seed,
        "ba_before": before.ba, "asr_before": before.asr, "ra_before": before.ra,
        "ba": after.ba, "asr": after.asr, "ra": after.ra,
        "n_clean": after.n_clean, "n_poisoned": after.n_poisoned,
        "before_source": before_source,
        "measured_on": measured_on,
        "ci95": intervals(after),
        "ci95_before": intervals(before),
        "der": (der(before.ba, before.asr, after.ba, after.asr) if before.asr is not None else None),
        "seconds": round(seconds, 2),
        "device": describe_device(device),
        "machine": machine,  # CPU, its kernels, torch, BLAS, threads: what else a result depends on
        "artifacts": out.artifacts,
        "curves": out.curves,
        "files": (sorted(p.name for p in artifacts.iterdir() if p.is_file())
                  if artifacts is not None and artifacts.is_dir() else []),
        "metric_definitions": metric_definitions(trigger),  # ASR / RA for its label mapping
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    card = copy.deepcopy(suspect.card)
    card["name"] = f"{suspect.name}+{name}"
    if measured_on == FULL_SPLIT:  # stamped: a later run on these weights reuses them as its "before"
        card["metrics"] = stamp_metrics(after, repaired, suspect.test, trigger)
    else:
        card["metrics"] = {**after.to_dict(), "evaluated_on": measured_on}
    card["provenance"] = {"source": "defense", "defense": name, "parent": suspect_ref or suspect.name,
                          "preset": preset, "params": asdict(params)}
    card.pop("skip_gammas", None)
    card.pop("created", None)
    card.pop("versions", None)
    report.suspect = Suspect(repaired, card, None, _plan=suspect._plan, _trigger_override=suspect._trigger_override)
    report.artifacts_dir = artifacts
    report_progress(1.0, "done", {"ba": after.ba, **({"asr": after.asr} if after.asr is not None else {})})
    return report
