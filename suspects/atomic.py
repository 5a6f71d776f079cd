"""Atomic writes: a file or a folder appears complete under its name, or not at all.

Everything is written to a hidden temporary sibling (``.NAME.<token>.partial``) in the same folder and renamed
over the real name at the end (``os.replace``, atomic on one filesystem). A crash, a full disk or a killed
process mid-write leaves at worst that hidden sibling, never a half-written file or folder under the real
name; on an ordinary error the sibling is removed.

>>> write_json(folder / "report.json", report)
>>> with atomic_folder(folder / "run-1") as tmp:   # run-1 appears only when the block ends without error
...     save_safetensors(tmp / "model.safetensors", state_dict)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["replacing", "write_bytes", "write_text", "write_json", "save_safetensors", "atomic_folder"]


def _sibling(path: Path, keep_suffix: bool = True) -> Path:
    """A fresh hidden name next to ``path``; it keeps ``path``'s suffix (``np.savez`` appends ``.npz`` otherwise)."""
    token = uuid.uuid4().hex[:8]
    suffix = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}.{token}.partial{suffix}")


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for any writer (``torch.save``, ``np.savez`` ...); when the block
    ends without error the file there replaces ``path``, otherwise it is removed.

    The temporary file is created by the writer, so it gets the usual permissions (the umask's), not ``0600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "xb") as fh:
        fh.write(data)
    return path


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, **dumps_kwargs)`` written to ``path`` atomically (serialised first: a value that cannot be
    written leaves the old file untouched)."""
    return write_text(path, json.dumps(obj, **dumps_kwargs))


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                     metadata: Mapping[str, Any] | None = None) -> Path:
    """Tensors (detached, on the CPU, contiguous) as a ``.safetensors`` file, atomically; metadata values become
    strings, as the format requires."""
    from safetensors.torch import save_file

    flat = {str(k): v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    path = Path(path)
    with replacing(path) as tmp:
        save_file(flat, str(tmp), metadata=meta or None)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False,
                  partial: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block ends without error it becomes ``path``.

    An existing ``path`` raises FileExistsError unless ``overwrite``; then it is swapped out at the very end (moved
    to a hidden backup, the new folder renamed in, the backup removed). On error the temporary folder is removed.
    ``partial`` names the temporary folder (default: a fresh hidden sibling), for callers that clean it up by name.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(partial) if partial is not None else _sibling(path, keep_suffix=False)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            backup = _sibling(path.with_name(f"{path.name}.old"), keep_suffix=False)
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
