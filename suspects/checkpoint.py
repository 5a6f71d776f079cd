"""Reading checkpoint files without running code from them, with errors a user can act on.

A suspect model comes, by definition, from someone not trusted, so a file is read as

- **safetensors** (plain tensors and a JSON header: nothing in it can run), or
- a **torch file** (``torch.save``'s zip archive, or its older pickle stream) through
  ``torch.load(weights_only=True)`` with an explicit allow-list of the numpy types BackdoorBench files hold.
  A pickle that asks for any other global (``os.system``, a class of some package ...) is refused before
  that global is imported, so its payload never runs.

The format is read off the file's first bytes, not its name. Every failure is a :class:`CheckpointError` whose
``summary`` is one line naming the user's file (the ``name`` a caller passes, e.g. an upload's own filename
instead of the temporary copy) and what is wrong with it, and whose ``details`` holds the underlying error text
for an expander (torch's advice to re-run with the unsafe loader is removed).
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["SuspectLoadError", "CheckpointError", "load_checkpoint", "load_state_dict_file", "sniff_format",
           "safe_globals", "MAX_CHECKPOINT_BYTES"]

MAX_CHECKPOINT_BYTES = 2 * 1024**3
_SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit on its JSON header
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save's pre-zip format starts by pickling a 10-byte magic number


class SuspectLoadError(ValueError):
    """A checkpoint or suspect folder could not be loaded; the message says why.

    ``summary`` is the message's first line (what a command line or a page shows); ``details`` any longer text.
    """

    def __init__(self, message: str = "", details: str = ""):
        super().__init__(message)
        self.details = details

    @property
    def summary(self) -> str:
        text = str(self).strip()
        return text.splitlines()[0] if text else type(self).__name__


class CheckpointError(SuspectLoadError):
    """A checkpoint file that cannot be used.

    ``file``: the user's name for it; ``kind``: ``missing``, ``too-large``, ``not-a-checkpoint``, ``truncated``,
    ``refused``, ``mismatch`` or ``not-a-state-dict``; ``refused_global``: for ``refused``, the global the pickle
    asked for (e.g. ``posix.system``) when it could be read off the file.
    """

    def __init__(self, file: str, kind: str, summary: str, details: str = "", refused_global: str | None = None):
        super().__init__(" ".join(summary.split()), _clean_details(details))
        self.file = file
        self.kind = kind
        self.refused_global = refused_global

    def __reduce__(self):  # picklable (a worker process may hand it back), with every field
        return (type(self), (self.file, self.kind, str(self), self.details, self.refused_global))


# --- the allow-list -----------------------------------------------------------------------------------------


def safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` may rebuild besides tensors: numpy arrays, dtypes and scalars (the
    ``numpy.core.*`` names of files written with numpy 1.x included, as most BackdoorBench runs are)."""
    import numpy as np

    allowed: list = [np.ndarray, np.dtype]
    try:
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover
        from numpy._core.multiarray import _reconstruct, scalar  # type: ignore[attr-defined]
    allowed += [_reconstruct, scalar]
    allowed += [(_reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]
    for name in dir(np.dtypes):
        obj = getattr(np.dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            allowed.append(obj)
    return allowed


def _allowed_names() -> set[str]:
    names: set[str] = set()
    for entry in safe_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    try:  # torch's own defaults (tensor rebuild functions, storages, OrderedDict ...)
        from torch._weights_only_unpickler import _get_allowed_globals

        names.update(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - a private helper; the prefix rule below covers torch's names
        pass
    return names


def _is_allowed(name: str, allowed: set[str]) -> bool:
    return name in allowed or name.startswith(("torch.", "collections.OrderedDict"))


# --- reading the file's kind and the globals its pickle asks for ----------------------------------------------


def sniff_format(path: str | os.PathLike) -> str:
    """``safetensors``, ``torch-zip``, ``torch-pickle`` (torch.save's older format), ``pickle`` (a plain pickle),
    ``truncated-safetensors`` or ``unknown``, from the first bytes of the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if head[:4] == _LEGACY_TORCH_MAGIC:
        return "torch-pickle"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= _SAFETENSORS_MAX_HEADER:
            return "safetensors" if 8 + n <= size else "truncated-safetensors"
    if path.suffix == ".safetensors" and 0 < size < 9:
        return "truncated-safetensors"
    return "unknown"


def _pickle_streams(path: Path, kind: str) -> list[bytes]:
    if kind == "torch-zip":
        try:
            with zipfile.ZipFile(path) as zf:
                return [zf.read(n) for n in zf.namelist() if n.endswith("data.pkl")]
        except (zipfile.BadZipFile, OSError, KeyError):
            return []
    with open(path, "rb") as fh:
        return [fh.read(64 * 1024**2)]


def _globals_in(data: bytes, limit: int = 8) -> list[str]:
    """Globals a pickle stream names (GLOBAL / STACK_GLOBAL), read statically: nothing is imported or run."""
    found: list[str] = []
    buf = io.BytesIO(data)
    for _ in range(limit):  # torch's older format is several pickles in a row
        strings: list[str] = []
        memo: dict[int, Any] = {}
        last: Any = None
        try:
            for op, arg, _pos in pickletools.genops(buf):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                                 "BINSTRING", "STRING"):
                    strings.append(str(arg))
                    last = arg
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = last
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
                    strings.append(memo[int(arg)])
                    last = memo[int(arg)]
                if op.name == "STOP":
                    break
            else:
                break
        except Exception:  # noqa: BLE001 - a truncated or odd stream: keep what was read
            break
        if buf.tell() >= len(data):
            break
    return found


def _refused_global(path: Path, kind: str, text: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return m.group(1)
    allowed = _allowed_names()
    for stream in _pickle_streams(path, kind):
        for name in _globals_in(stream):
            if not _is_allowed(name, allowed):
                return name
    return None


def _opcode_name(code: int) -> str:
    """A pickle instruction's name from its byte value (149 -> FRAME), or "unknown"."""
    return next((op.name for op in pickletools.opcodes if ord(op.code) == code), "unknown")


def _plain_refusal(wanted: str, text: str) -> str:
    """The details of a refused pickle in plain words: which global it asked for, what that means, and (when the
    safe loader stopped at an instruction it does not run) which one, by name rather than by number."""
    module, _, attr = wanted.rpartition(".")
    lines = [f"The file's pickle asks for the Python global {wanted} (name {attr!r} from module {module!r}). "
             "Unpickling imports such a global and calls it with arguments from the file: that is how a pickle runs "
             "code. The safe loader allows only tensors, numbers, strings, "
             "containers and the numpy types checkpoints hold, so it stopped; nothing from the file was run."]
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        code = int(m.group(1))
        lines.append(f"It stopped at pickle instruction {_opcode_name(code)} (byte {code}), which it does not accept "
                     "in a plain pickle; the global above was read from the file without running anything.")
    else:
        lines.append(f"The safe loader said: {_clean_details(text)}")
    return "\n".join(lines)


_ADVICE = re.compile(r"weights.only|torch\.load|file an issue|trusted source|WeightsUnpickler error:\s*$", re.I)


def _clean_details(text: str) -> str:
    """The underlying error without torch's advice to load the file with the unsafe loader."""
    lines = [ln.rstrip() for ln in str(text).splitlines()]
    return "\n".join(ln for ln in lines if ln.strip() and not _ADVICE.search(ln)).strip()


# --- loading ------------------------------------------------------------------------------------------------


def _check_file(path: Path, name: str) -> None:
    if not path.is_file():
        raise CheckpointError(name, "missing", f"{name} does not exist" if not path.exists()
                              else f"{name} is not a file")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(name, "too-large", f"{name} is larger than {MAX_CHECKPOINT_BYTES // 1024**2} MB")


def load_checkpoint(path: str | os.PathLike, name: str | None = None) -> Any:
    """The object a checkpoint file holds (a state dict, BackdoorBench's result dict, an array ...), read without
    running code from it (see the module docstring). ``name`` is the file's name in messages (default ``path``).

    Raises :class:`CheckpointError` (a ``ValueError``) with a one-line ``summary`` and the underlying ``details``.
    """
    path = Path(path)
    name = name or str(path)
    _check_file(path, name)
    kind = sniff_format(path)
    if kind == "unknown":
        raise CheckpointError(name, "not-a-checkpoint",
                              f"{name}: not a checkpoint (neither safetensors nor a torch file)")
    if kind in ("safetensors", "truncated-safetensors"):
        from safetensors.torch import load_file

        try:
            if kind == "truncated-safetensors":
                raise ValueError("the file ends before its header says it does")
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ValueError: all mean a broken file
            raise CheckpointError(name, "truncated", f"{name}: truncated or corrupted (safetensors file)",
                                  f"{type(err).__name__}: {err}") from None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
            with torch.serialization.safe_globals(safe_globals()):
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - classified below; the file's own errors never escape raw
        text = f"{type(err).__name__}: {err}"
        wanted = _refused_global(path, kind, str(err))
        if wanted is not None:
            raise CheckpointError(name, "refused", f"refused to load {name}: it asks to run code ({wanted})",
                                  _plain_refusal(wanted, text), refused_global=wanted) from None
        if isinstance(err, pickle.UnpicklingError) and re.search(r"Unsupported|not an allowed|blocked", str(err)):
            raise CheckpointError(name, "refused", f"refused to load {name}: its pickle uses instructions the safe "
                                  "loader does not run", text) from None
        if kind == "pickle":
            raise CheckpointError(name, "not-a-checkpoint", f"{name}: not a checkpoint (a plain pickle: neither "
                                  "safetensors nor a torch file)", text) from None
        if kind == "torch-zip" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if not any(n.endswith("data.pkl") for n in zf.namelist()):
                    raise CheckpointError(name, "not-a-checkpoint", f"{name}: not a checkpoint (a zip archive "
                                          "without a torch model: neither safetensors nor a torch file)",
                                          text) from None
        raise CheckpointError(name, "truncated", f"{name}: truncated or corrupted (torch file)", text) from None


def load_state_dict_file(path: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """:func:`load_checkpoint` for files that must hold a dict (a state dict, or one wrapping it)."""
    name = name or str(path)
    obj = load_checkpoint(path, name)
    if not isinstance(obj, dict):
        raise CheckpointError(name, "not-a-state-dict", f"{name} holds a {type(obj).__name__}, not a state dict")
    return obj
