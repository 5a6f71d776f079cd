"""A model without its code: a ``torch.export`` program (``.pt2``) as a suspect.

``torch.export.save`` writes a zip archive: the graph as JSON (ATen operators by name) and the weights, some of
them as nested ``torch.save`` archives or plain pickles. ``torch.export.load`` unpickles those with the unsafe
loader, so before it runs, every pickle stream in the archive (nested archives included) is read statically and
the file is refused if any asks for a global outside the allow-list of :mod:`suspects.checkpoint` (tensor rebuild
functions, storages, numpy arrays): nothing in the file runs. The program needs no class definition.

What applies: the graph runs as one function, so whatever needs module hooks (Grad-CAM, activation statistics,
penultimate features, skip ablation, pruning) or rebuilding the architecture from its card (every defense: a
repaired model is stored as weights plus a card) does not; BA / ASR / RA, Neural Cleanse (input gradients only)
and black-box input screening do. :func:`suspects.models.missing_capabilities` says so for each view.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, _allowed_names, _check_file, _globals_in, _is_allowed

__all__ = ["ExportedModel", "load_exported", "scan_archive"]


def _streams(data: bytes, depth: int = 0) -> list[bytes]:
    """The pickle streams in ``data``: itself if it is one, those of a nested zip archive, else none."""
    if data[:2] == b"PK" and depth < 3:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                return [s for n in zf.namelist() for s in _streams(zf.read(n), depth + 1)]
        except zipfile.BadZipFile:
            return []
    if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        return [data]
    return []


def scan_archive(path: Path, name: str) -> int:
    """Refuse (:class:`CheckpointError`, kind ``refused``) an archive whose pickles ask for a global outside the
    allow-list; returns how many pickle streams were read."""
    allowed = _allowed_names()
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
            n = 0
            for member in members:
                for stream in _streams(zf.read(member)):
                    n += 1
                    for wanted in _globals_in(stream, limit=64):
                        if not _is_allowed(wanted, allowed):
                            raise CheckpointError(name, "refused",
                                                  f"refused to load {name}: it asks to run code ({wanted})",
                                                  f"{member} asks for the global {wanted}", refused_global=wanted)
    except zipfile.BadZipFile as err:
        raise CheckpointError(name, "not-a-checkpoint", f"{name}: not a torch.export program (not a zip archive)",
                              str(err)) from None
    return n


class ExportedModel(nn.Module):
    """An exported program's module behind this project's input normalisation. It offers no module hooks and
    cannot be rebuilt from a card (``exported_program``); see the module docstring for what applies."""

    exported_program = True
    sequential_blocks = False

    def __init__(self, program: nn.Module, mean: list[float], std: list[float], num_classes: int):
        super().__init__()
        from .models import Normalize

        self.normalize = Normalize(mean, std)
        self.program = program
        self.num_classes = int(num_classes)
        self.fixed_batch: int | None = None  # a program exported for one batch size runs in chunks of it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.fixed_batch and len(x) != self.fixed_batch:
            b = self.fixed_batch
            if len(x) % b:
                raise ValueError(f"this exported program takes batches of exactly {b} images")
            return torch.cat([self.program(x[i:i + b]) for i in range(0, len(x), b)])
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedModel:  # an exported graph has no train mode to switch
        self.training = mode
        return self


def load_exported(path: Path, name: str, num_classes: int | None = None, input_shape: tuple | None = None,
                  classes: list[str] | None = None, data: Any = None, trigger: dict | None = None,
                  normalize: str | None = None, suspect_name: str | None = None, **_: Any):
    """A suspect from a ``.pt2`` program (see the module docstring)."""
    from .data import source_input_shape
    from .store import Suspect, SuspectLoadError, normalization_for

    _check_file(path, name)
    scan_archive(path, name)
    try:
        program = torch.export.load(str(path)).module()
    except Exception as err:  # noqa: BLE001 - a broken or foreign archive: one line, details apart
        raise CheckpointError(name, "truncated", f"{name}: not a loadable torch.export program",
                              f"{type(err).__name__}: {err}") from None
    data_spec = {"name": data} if isinstance(data, str) else data
    shape = tuple(input_shape) if input_shape else source_input_shape(data_spec)
    if shape is None:
        raise SuspectLoadError(f"{name}: an exported program needs its input shape (--input-shape C H W or --data)")
    norm = normalization_for(normalize, data_spec, int(shape[0]))
    model = ExportedModel(program, norm["mean"], norm["std"], 2)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape))
    except Exception as err:  # noqa: BLE001 - the program refuses this input shape
        raise SuspectLoadError(f"{name}: the exported program does not take inputs of shape {tuple(shape)}: "
                               f"{type(err).__name__}") from None
    k = int(out.shape[-1])
    try:
        with torch.no_grad():
            model(torch.zeros(2, *shape))
    except Exception:  # noqa: BLE001 - exported with a static batch of one: run image by image
        model.fixed_batch = 1
    if num_classes is not None and int(num_classes) != k:
        raise SuspectLoadError(f"{name}: the program has {k} outputs but num_classes={num_classes}")
    if classes is not None and len(classes) != k:
        raise SuspectLoadError(f"{name}: {len(classes)} class names given but the program has {k} outputs")
    model.num_classes = k
    card = {"name": suspect_name or path.stem, "arch": "exported", "arch_kwargs": {},
            "classes": list(classes or [str(i) for i in range(k)]), "input_shape": list(shape), "data": data_spec,
            "trigger": trigger, "normalization": norm,
            "provenance": {"source": "torch.export program", "file": name}}
    return Suspect(model.eval(), card, None)
