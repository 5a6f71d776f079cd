"""Defense registry: name -> Defense instance. Adding a defense is one module and one ``@register_defense``."""

from __future__ import annotations

from .base import Defense

__all__ = ["register_defense", "get_defense", "list_defenses", "all_defenses"]

_REGISTRY: dict[str, Defense] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    from . import anp, awm, cbd, dbd, fineprune, finetune, linf_prune, shortcut  # noqa: F401


def get_defense(name: str) -> Defense:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown defense {name!r}; registered: {', '.join(list_defenses())}")
    return _REGISTRY[name]


ORDER = ("shortcut", "linf_prune", "awm", "anp", "fineprune", "finetune", "dbd", "cbd")


def list_defenses() -> list[str]:
    """Registered names: the paper's methods first, then the baselines, then anything added later."""
    _load_all()
    return sorted(_REGISTRY, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def all_defenses() -> list[Defense]:
    return [_REGISTRY[n] for n in list_defenses()]
