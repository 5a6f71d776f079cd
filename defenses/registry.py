"""Defense registry: name -> Defense instance. Adding a defense is one module (or subpackage) of ``defenses``
with one ``@register_defense`` class; the registry finds it by itself.

Discovery walks the ``defenses`` package with :mod:`pkgutil` and imports the modules and subpackages whose
source registers a defense (a line starting with ``@register_defense``); the others (the runner, shared
helpers, ...) are not imported. The listing is sorted by each class's ``order``, then by name.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from .base import Defense

__all__ = ["register_defense", "get_defense", "list_defenses", "all_defenses", "defense_modules"]

_REGISTRY: dict[str, Defense] = {}
_MARK = re.compile(r"^@register_defense\b", re.MULTILINE)
_loaded = False


def register_defense(cls: type[Defense]) -> type[Defense]:
    _REGISTRY[cls.name] = cls()
    return cls


def _registers(path: Path) -> bool:
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    for f in files:
        try:
            if _MARK.search(f.read_text(encoding="utf-8")):
                return True
        except OSError:
            continue
    return False


def defense_modules() -> list[str]:
    """Full names of the modules and subpackages of ``defenses`` that register a defense."""
    package = importlib.import_module(__package__)
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        base = Path(info.module_finder.path) / info.name  # type: ignore[union-attr]
        path = base if info.ispkg else base.with_suffix(".py")
        if _registers(path):
            found.append(f"{__package__}.{info.name}")
    return sorted(found)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for module in defense_modules():
        importlib.import_module(module)
    _loaded = True


def get_defense(name: str) -> Defense:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown defense {name!r}; registered: {', '.join(list_defenses())}")
    return _REGISTRY[name]


def list_defenses() -> list[str]:
    """Registered names: the paper's methods first, then the baselines, then anything added later (by ``order``)."""
    _load_all()
    return sorted(_REGISTRY, key=lambda n: (type(_REGISTRY[n]).order, n))


def all_defenses() -> list[Defense]:
    return [_REGISTRY[n] for n in list_defenses()]
