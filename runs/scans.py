"""Stored Neural Cleanse scans and suspects that adopt a recovered trigger, under the run-store folder.

A scan (:func:`analysis.reverse.scan_suspect`, Wang et al., IEEE S&P 2019) is stored once per (model weights,
data, budget) under ``<root>/detections/<model fingerprint>/neural_cleanse-<digest>.{npz,json}`` and reused by
any later scan of the same three, from the CLI's ``detect``, the Detection page or a script. The ``.npz`` is
written first and the ``.json`` last: a scan is complete only when its JSON exists. A suspect that uses a
recovered trigger is saved under ``<root>/recovered/``, where the dashboard's suspect picker lists it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from analysis.reverse import (
    ReverseResult,
    ScanConfig,
    anomaly_indices,
    model_fingerprint,
    recovered_trigger_spec,
)
from analysis.reverse import scan_suspect as compute_scan
from suspects.atomic import replacing, write_json
from suspects.store import adopt_trigger, save

from .store import runs_root

__all__ = ["scan_suspect", "stored_scan", "load_scan", "scan_file", "save_recovered_suspect"]


def scan_file(root: str | os.PathLike, suspect, config: ScanConfig) -> Path:
    """Where the scan of ``suspect``'s current weights, its data and ``config`` is stored (no suffix)."""
    key = json.dumps({"config": asdict(config), "data": suspect.card.get("data"),
                      "split": suspect.card.get("split")}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(root) / "detections" / model_fingerprint(suspect.model)[:24] / f"neural_cleanse-{digest}"


def _save_scan(base: Path, result: ReverseResult) -> None:
    with replacing(base.with_suffix(".npz")) as tmp:
        extra = {} if result.epoch_success is None else {"epoch_success": result.epoch_success}
        np.savez_compressed(tmp, masks=result.masks, patterns=result.patterns, l1=result.l1, success=result.success,
                            **extra)
    meta = {k: v for k, v in result.to_dict().items() if k != "stored"}
    write_json(base.with_suffix(".json"), meta)  # written last: the scan is complete only now


def load_scan(base: str | os.PathLike) -> ReverseResult | None:
    """A stored scan, or None when it is missing or unreadable (then it is simply computed again)."""
    base = Path(base)
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        with np.load(base.with_suffix(".npz"), allow_pickle=False) as arr:
            masks, patterns, l1, success = arr["masks"], arr["patterns"], arr["l1"], arr["success"]
            epoch_success = arr["epoch_success"] if "epoch_success" in arr.files else None
        created = str(meta.get("created") or "") or time.strftime(
            "%Y-%m-%d %H:%M", time.localtime(base.with_suffix(".json").stat().st_mtime))
    except (OSError, ValueError, KeyError):
        return None
    anomaly = anomaly_indices(l1)
    threshold = float(meta.get("threshold", 2.0))
    flagged = [int(i) for i in np.nonzero(anomaly > threshold)[0]]
    return ReverseResult(masks, patterns, l1, success, anomaly, flagged, threshold,
                         seconds=float(meta.get("seconds", 0.0)), config=dict(meta.get("config") or {}),
                         epoch_success=epoch_success, created=created, stored=True)


def stored_scan(suspect, config: ScanConfig, cache_root: str | os.PathLike | None = None) -> ReverseResult | None:
    """The stored scan of this suspect's weights, data and budget, or None when it was never run.
    ``cache_root`` defaults to :func:`runs.store.runs_root`."""
    return load_scan(scan_file(runs_root(cache_root), suspect, config))


def scan_suspect(suspect, config: ScanConfig | None = None, cache_root: str | os.PathLike | None = None,
                 progress: Callable[[float, str, dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, recompute: bool = False) -> ReverseResult:
    """:func:`analysis.reverse.scan_suspect`, stored under ``<cache_root>/detections/`` and reused by any later
    scan of the same weights, data and budget (``recompute`` ignores a stored one). Without ``cache_root`` nothing
    is stored."""
    config = config or ScanConfig()
    config.check()
    base = scan_file(cache_root, suspect, config) if cache_root is not None else None
    if base is not None and not recompute:
        found = load_scan(base)
        if found is not None:
            return found
    result = compute_scan(suspect, config, progress=progress, should_stop=should_stop)
    if base is not None:
        _save_scan(base, result)
    return result


def save_recovered_suspect(suspect, result: ReverseResult, target: int, root: str | os.PathLike | None = None,
                           parent: str | None = None) -> Path:
    """Save a copy of ``suspect`` that uses the recovered trigger of class ``target`` under ``<root>/recovered/``
    (``root`` defaults to :func:`runs.store.runs_root`); the dashboard's suspect picker lists it, and every view
    and defense then uses that trigger."""
    adopted = adopt_trigger(suspect, recovered_trigger_spec(result, target), parent=parent)
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in (parent or suspect.name).removeprefix("demo:"))
    folder = runs_root(root) / "recovered" / f"{slug}-class{int(target)}-{model_fingerprint(suspect.model)[:8]}"
    return save(adopted, folder, overwrite=True)
