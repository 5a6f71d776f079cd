"""Parameters as dataclasses: one field helper with paper names, units, ranges and help text, and validation.

Used by defenses (``defenses.base``) and input screeners (``analysis.screening``) alike: the dashboard renders
the fields as widgets and the command line as ``--set name=value``; nonsense values raise :class:`ParamError`
before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

__all__ = ["ParamError", "param", "param_specs", "params_from"]


class ParamError(ValueError):
    """A parameter is outside its range or of the wrong type; the message names it."""


def param(default: Any, *, help: str, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, integer: bool = False) -> Any:
    """A dataclass field with the metadata used for validation and widgets."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices,
                                            "integer": integer})


def param_specs(params_cls: type) -> list[dict[str, Any]]:
    """Name, type, default and metadata of every parameter (for widgets, flags and docs)."""
    out = []
    for f in dataclasses.fields(params_cls):
        out.append({"name": f.name, "default": f.default, "type": type(f.default).__name__, **f.metadata})
    return out


def _coerce(name: str, value: Any, spec: dict[str, Any]) -> Any:
    default = spec["default"]
    if spec.get("choices"):
        if value not in spec["choices"]:
            raise ParamError(f"parameter {name!r} must be one of {list(spec['choices'])}, got {value!r}")
        return value
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ParamError(f"parameter {name!r} must be true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            num = float(value)
        except (TypeError, ValueError) as err:
            raise ParamError(f"parameter {name!r} must be a number, got {value!r}") from err
        if not math.isfinite(num):
            raise ParamError(f"parameter {name!r} must be finite, got {value!r}")
        if spec.get("integer") or isinstance(default, int):
            if num != int(num):
                raise ParamError(f"parameter {name!r} must be a whole number, got {value!r}")
            num = int(num)
        lo, hi = spec.get("min"), spec.get("max")
        if (lo is not None and num < lo) or (hi is not None and num > hi):
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ParamError(f"parameter {name!r} must lie in {rng}, got {value!r}")
        return num
    return value


def params_from(params_cls: type, values: dict[str, Any] | None = None) -> Any:
    """Build and validate a parameters dataclass; unknown names and out-of-range values raise :class:`ParamError`."""
    values = dict(values or {})
    specs = {s["name"]: s for s in param_specs(params_cls)}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ParamError(f"unknown parameter(s) {unknown}; known: {sorted(specs)}")
    clean = {k: _coerce(k, v, specs[k]) for k, v in values.items()}
    obj = params_cls(**clean)
    check = getattr(obj, "check", None)
    if callable(check):
        check()
    return obj
