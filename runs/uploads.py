"""Suspects kept under the run-store folder besides finished runs: uploads, recovered triggers, imports.

- :func:`save_upload`: an uploaded checkpoint (bytes and the user's filename) read safely
  (:mod:`suspects.checkpoint`) and saved as a suspect folder under ``<root>/uploads/<name>-<sha256 prefix>/``.
- :func:`stored_suspects`: the suspects the run store holds (complete finished runs, then recovered, uploaded and
  imported suspects, newest first), for the dashboard's picker.
- :func:`read_card` / :func:`card_name`: a suspect folder's ``suspect.json`` read leniently, for labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import suspects
from suspects.store import CARD_FILE, Suspect
from suspects.triggers import trigger_from_spec

from .store import INDEX_FILE, RunStore, runs_root

__all__ = ["UPLOAD_LIMIT_MB", "SUBFOLDERS", "save_upload", "save_checkpoint", "upload_folder", "stored_suspects", "read_card",
           "card_name"]

UPLOAD_LIMIT_MB = 200
SUBFOLDERS = ("recovered", "uploads", "imports")  # suspects under the root that are not runs


def _safe_stem(filename: str) -> str:
    stem = Path(filename).stem or "upload"
    return "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in stem)[:80]


def upload_folder(raw: bytes, filename: str, root: str | os.PathLike | None = None) -> Path:
    """The folder an upload of these bytes under this filename is saved in (the same upload, the same folder)."""
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return runs_root(root) / "uploads" / f"{_safe_stem(filename)}-{digest}"


def save_upload(raw: bytes, filename: str, arch: str, data: str, arch_kwargs: dict[str, Any] | None = None,
                root: str | os.PathLike | None = None, limit_mb: int = UPLOAD_LIMIT_MB, normalize: str | None = None,
                trigger: dict[str, Any] | None = None) -> tuple[Path, Suspect]:
    """Read an uploaded state dict (``.safetensors`` / ``.pt`` / ``.pth``) as architecture ``arch`` measured on the
    data source ``data``, and save it as a suspect folder under ``<root>/uploads/``; returns the folder and suspect.

    ``normalize`` names the model's input normalisation (default: the data source's standard one, recorded as
    assumed); ``trigger`` a trigger spec when the attack is known (None: unknown, to be detected). Nothing in the
    file runs. Errors name ``filename`` (the user's own), never the temporary copy:
    :class:`suspects.CheckpointError` for the file itself, :class:`suspects.SuspectLoadError` otherwise, and
    :class:`suspects.DatasetNotFoundError` when the data source is missing.
    """
    if len(raw) > limit_mb * 1024**2:
        raise suspects.SuspectLoadError(f"{filename} is larger than {limit_mb} MB")
    try:
        pair = suspects.load_dataset(data)
    except Exception as err:  # noqa: BLE001 - any failure to open the data source is reported as such
        raise suspects.DatasetNotFoundError(f"data source {data!r}: {err}") from err
    suffix = Path(filename).suffix.lower()
    with tempfile.TemporaryDirectory(prefix="backdoor-lens-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(raw)
        suspect = suspects.load(path, arch=arch, classes=pair.classes, input_shape=pair.input_shape,
                                data={"name": data}, arch_kwargs=dict(arch_kwargs or {}),
                                name=Path(filename).stem, label=filename, normalize=normalize or None,
                                trigger=trigger)
    if trigger:  # the attack as the form or flags gave it: refused in one line before anything is saved
        try:
            trigger_from_spec(trigger, suspect.input_shape, suspect.num_classes)
        except (KeyError, TypeError, ValueError) as err:
            raise suspects.SuspectLoadError(str(err).strip("'\"")) from err
    suspect.card["provenance"] = {"source": "upload", "file": filename,
                                  "sha256_prefix": hashlib.sha256(raw).hexdigest()[:12]}
    folder = suspects.save(suspect, upload_folder(raw, filename, root), overwrite=True)
    return folder, suspect


def save_checkpoint(path: str | os.PathLike, suspect: Suspect, root: str | os.PathLike | None = None) -> Path:
    """Keep a suspect loaded from a bare checkpoint file (on the command line) as a suspect folder under
    ``<root>/uploads/``, in the folder an upload of the same bytes under the same name gets, so a job, the run store
    and Compare can load it again. Its card records the file it came from."""
    path = Path(path)
    raw = path.read_bytes()
    folder = upload_folder(raw, path.name, root)
    card = dict(suspect.card)
    card["provenance"] = {**(card.get("provenance") or {}), "source": "checkpoint", "file": path.name,
                          "sha256_prefix": hashlib.sha256(raw).hexdigest()[:12]}
    return suspects.save(Suspect(suspect.model, card, None), folder, overwrite=True)


def read_card(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A suspect folder's card, or None when it is missing or not a JSON object."""
    try:
        card = json.loads((Path(folder) / CARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def card_name(folder: str | os.PathLike, default: str | None = None) -> str:
    """The ``name`` in a suspect folder's card, else ``default`` (else the folder's name)."""
    card = read_card(folder) or {}
    return str(card.get("name") or default or Path(folder).name)


def stored_suspects(root: str | os.PathLike | None = None, store: RunStore | None = None) -> list[str]:
    """Folders of the suspects the run store holds: complete finished runs, then recovered, uploaded and imported
    (BackdoorBench) suspects, newest first. ``store`` is reused when given (else opened when the index exists)."""
    root = runs_root(root)
    if not root.is_dir():
        return []
    if store is None and (root / INDEX_FILE).exists():
        store = RunStore(root)
    finished = store.finished_suspects() if store is not None else []
    extra = sorted((p.parent for sub in SUBFOLDERS for p in (root / sub).glob(f"*/{CARD_FILE}")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    return finished + [str(p) for p in extra]
