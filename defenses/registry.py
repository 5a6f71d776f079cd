"""Defense registry: name -> Defense instance. Adding a defense is one module (or subpackage) of ``defenses``
with one ``@register_defense`` class, declared as a ``backdoor_lens.defenses`` entry point in ``pyproject.toml``;
an installed package adds its own defense the same way (:mod:`suspects.plugins`, ``docs/plugins.md``).

Discovery reads the entry points (Backdoor Lens's own first, then installed plugins). As a fallback for an install
whose metadata predates them, it also walks the ``defenses`` package with :mod:`pkgutil` and imports the modules and
subpackages whose source registers a defense (a line starting with ``@register_defense``); the others (the runner,
shared helpers, ...) are not imported. :func:`register_defense` checks the interface (``repair``, a ``Params``
dataclass, ``quick`` and ``paper`` presets that build, a threat model) and refuses a name that is already taken.
The listing is sorted by each class's ``order``, then by name.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from suspects.plugins import PluginError, check_params_and_presets, claim_name, load_plugins

from .base import Defense, ThreatModel

__all__ = ["register_defense", "check_defense", "get_defense", "list_defenses", "all_defenses", "defense_modules",
           "reload_plugins"]

_REGISTRY: dict[str, Defense] = {}
_MARK = re.compile(r"^@register_defense\b", re.MULTILINE)
_loaded = False


def check_defense(cls: object) -> None:
    """Raise :class:`PluginError` (with the reason) when ``cls`` lacks what the :class:`Defense` interface needs."""
    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        raise PluginError(f"{cls!r} is not a subclass of defenses.base.Defense")
    where = f"defense {cls.__qualname__}"
    if not isinstance(cls.title, str) or not cls.title.strip():
        raise PluginError(f"{where} has no title")
    if cls.repair is Defense.repair:
        raise PluginError(f"{where} does not implement repair(model, params, ctx)")
    if not isinstance(cls.threat, ThreatModel):
        raise PluginError(f"{where}: threat must be a defenses.base.ThreatModel")
    check_params_and_presets(where, cls, ("quick", "paper"))


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: check ``cls`` (:func:`check_defense`) and register one instance under ``cls.name``."""
    check_defense(cls)
    claim_name("defenses", _REGISTRY, cls.name, cls)
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
    _loaded = True
    load_plugins("defenses", _REGISTRY, register_defense, builtin_modules=defense_modules())


def reload_plugins() -> None:
    """Read the entry points again (after a ``pip install`` in a running notebook; tests)."""
    global _loaded
    from suspects.plugins import reset_plugins

    reset_plugins("defenses")
    _loaded = False


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
