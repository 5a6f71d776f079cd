"""Plugins: the one door through which every registry's entries come, built-in or installed.

Each of the four registries (defenses, attacks, architectures, screeners) reads the Python entry points of its group
(``backdoor_lens.defenses``, ``backdoor_lens.attacks``, ``backdoor_lens.architectures``,
``backdoor_lens.screeners``; PyPA entry-point specification). Backdoor Lens declares its own methods the same way in
its ``pyproject.toml``, so an installed package's method lives next to the built-in ones with nothing forked.

An entry point names either a class / function (``my_defense = "my_pkg.defense:MyDefense"``: the registry's
``register`` function checks it and registers it) or a module whose import registers things with the registry's
decorator (``finetune = "defenses.finetune"``). The registry's own built-ins are loaded first, then installed
packages by distribution and entry-point name, so a plugin can never replace a built-in.

A plugin that cannot be loaded (an import error, a name that is already taken, a class that lacks what the interface
requires) is *refused*: whatever it registered is taken out again, the reason is logged once (one line, by name) and
kept in :func:`plugin_records` for ``backdoor-lens plugins`` and the dashboard; nothing else is affected.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import logging
import re
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["GROUPS", "BUILTIN_DIST", "PluginError", "check_params_and_presets", "PluginRecord", "load_plugins", "plugin_records", "refused",
           "claim_name", "reset_plugins"]

GROUPS = {
    "defenses": "backdoor_lens.defenses",
    "attacks": "backdoor_lens.attacks",
    "architectures": "backdoor_lens.architectures",
    "screeners": "backdoor_lens.screeners",
}
BUILTIN_DIST = "backdoor-lens"
SINGULAR = {"defenses": "defense", "attacks": "attack", "architectures": "architecture", "screeners": "screener"}

log = logging.getLogger("backdoor_lens.plugins")


class PluginError(ValueError):
    """An entry that a registry refuses; the message is the reason, in one line."""


@dataclass
class PluginRecord:
    """One entry point (or, for an install whose metadata predates the entry points, one built-in module)."""

    kind: str  # defenses | attacks | architectures | screeners
    name: str  # the entry point's name
    value: str  # what it points at: "module" or "module:attribute"
    dist: str  # the distribution that declares it, with its version
    builtin: bool
    status: str  # "loaded" or "refused"
    provides: list[str] = field(default_factory=list)  # registry names it added
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_RECORDS: dict[str, list[PluginRecord]] = {}
_LOADING: set[str] = set()


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _module_of(value: Any) -> str:
    """The module that defines a registry value (a class, a function, or an instance of a class)."""
    return str(getattr(value, "__module__", "") or "")


def _definition(value: Any) -> Any:
    """The class or function behind a registry value (the defense registry holds instances)."""
    return value if isinstance(value, type) or inspect.isroutine(value) else type(value)


def _describe(value: Any) -> str:
    target = _definition(value)
    return f"{target.__module__}.{target.__qualname__}"


def check_params_and_presets(where: str, cls: Any, required: Iterable[str]) -> None:
    """Raise :class:`PluginError` unless ``cls.Params`` is a dataclass and ``cls.presets`` holds every ``required``
    preset, each of which builds (the shared check of defenses and screeners)."""
    import dataclasses

    from .params import params_from

    if not (isinstance(cls.Params, type) and dataclasses.is_dataclass(cls.Params)):
        raise PluginError(f"{where}: Params must be a dataclass, got {cls.Params!r}")
    required = list(required)
    if not isinstance(cls.presets, dict) or not set(required) <= set(cls.presets):
        raise PluginError(f"{where} needs the preset(s) {', '.join(repr(r) for r in required)}")
    for preset, values in cls.presets.items():
        try:
            params_from(cls.Params, dict(values))
        except (TypeError, ValueError) as err:
            raise PluginError(f"{where}: preset {preset!r} does not build: {err}") from None


def claim_name(kind: str, registry: MutableMapping[str, Any], name: Any, value: Any) -> str:
    """Check that ``name`` is a usable registry name not already taken by another definition; return it.

    Registering the same definition again (a module imported twice) is allowed; anything else is a
    :class:`PluginError`, so a plugin can never silently replace a built-in or another plugin."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", name):
        raise PluginError(f"{SINGULAR[kind]} name must be a word of letters, digits, '_' or '-', got {name!r}")
    old = registry.get(name)
    if old is not None and _describe(old) != _describe(value):
        raise PluginError(f"{SINGULAR[kind]} name {name!r} is already taken by {_describe(old)}")
    return name


def _entry_points(group: str) -> list[md.EntryPoint]:
    """The group's entry points: Backdoor Lens's own first, then the others by distribution and name."""
    try:
        eps = list(md.entry_points(group=group))
    except Exception as err:  # a broken metadata folder somewhere on sys.path
        log.warning("backdoor-lens: could not read the installed entry points (%s)", err)
        return []
    return sorted(eps, key=lambda ep: (_norm(_dist_name(ep)) != BUILTIN_DIST, _norm(_dist_name(ep)), ep.name))


def _dist_name(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return str(dist.metadata["Name"]) if dist is not None else "?"


def _dist_label(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "?"


def _reason(err: BaseException) -> str:
    if isinstance(err, PluginError):
        return str(err)
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, ImportError):
        return f"import failed: {text}"
    return f"{type(err).__name__}: {text}"


def _provided_by(registry: MutableMapping[str, Any], obj: Any) -> list[str]:
    if isinstance(obj, ModuleType):
        mod = obj.__name__
        return [n for n, v in registry.items() if _module_of(v) == mod or _module_of(v).startswith(mod + ".")]
    return [n for n, v in registry.items() if v is obj or type(v) is obj]


def _load_one(kind: str, registry: MutableMapping[str, Any], register: Callable[[Any], Any], name: str,
              value: str, dist: str, builtin: bool, load: Callable[[], Any]) -> PluginRecord:
    before = dict(registry)
    record = PluginRecord(kind, name, value, dist, builtin, "loaded")
    try:
        obj = load()
        provides = _provided_by(registry, obj)
        if not provides and not isinstance(obj, ModuleType):
            register(obj)
            provides = _provided_by(registry, obj)
        if not provides:
            what = f"module {obj.__name__}" if isinstance(obj, ModuleType) else _describe(obj)
            raise PluginError(f"{what} registers no {SINGULAR[kind]}")
        record.provides = provides
    except (Exception, SystemExit) as err:  # a plugin must never take the registry (or the app) down with it
        for key in [k for k in registry if k not in before or registry[k] is not before[k]]:
            if key in before:
                registry[key] = before[key]
            else:
                del registry[key]
        record.status, record.reason = "refused", _reason(err)
    return record


def load_plugins(kind: str, registry: MutableMapping[str, Any], register: Callable[[Any], Any],
                 builtin_modules: Iterable[str] = ()) -> list[PluginRecord]:
    """Load the ``kind`` group's entry points into ``registry`` once per process; return their records.

    ``register`` is the registry's decorator (it checks an entry and raises :class:`PluginError` with the reason);
    ``builtin_modules`` are the registry's own modules, imported as a fallback when the installed metadata of
    Backdoor Lens predates its entry points (an old ``pip install -e .``)."""
    if kind in _RECORDS or kind in _LOADING:
        return _RECORDS.get(kind, [])
    _LOADING.add(kind)
    records: list[PluginRecord] = []
    try:
        eps = _entry_points(GROUPS[kind])
        own = [ep for ep in eps if _norm(_dist_name(ep)) == BUILTIN_DIST]
        others = [ep for ep in eps if _norm(_dist_name(ep)) != BUILTIN_DIST]
        for ep in own:
            records.append(_load_one(kind, registry, register, ep.name, ep.value, _dist_label(ep), True, ep.load))
        covered = {ep.value.split(":")[0].strip() for ep in own}
        for mod in builtin_modules:
            if mod not in covered:
                records.append(_load_one(kind, registry, register, mod.rsplit(".", 1)[-1], mod,
                                         f"{BUILTIN_DIST} (not in the installed metadata: pip install -e .)", True,
                                         lambda mod=mod: importlib.import_module(mod)))
        for ep in others:
            records.append(_load_one(kind, registry, register, ep.name, ep.value, _dist_label(ep), False, ep.load))
        _RECORDS[kind] = records
    finally:
        _LOADING.discard(kind)
    for r in records:
        if r.status == "refused":
            log.warning("backdoor-lens: %s plugin %r (%s, from %s) refused: %s", SINGULAR[kind], r.name, r.value,
                        r.dist, r.reason)
    return records


def plugin_records(kinds: Iterable[str] = tuple(GROUPS)) -> list[PluginRecord]:
    """The records of the groups in ``kinds`` that have been loaded (a registry loads its group on first use)."""
    return [r for kind in kinds for r in _RECORDS.get(kind, [])]


def refused(kind: str) -> list[PluginRecord]:
    """The refused entries of a group that has been loaded (nothing is loaded here)."""
    return [r for r in _RECORDS.get(kind, []) if r.status == "refused"]


def reset_plugins(kind: str | None = None) -> None:
    """Forget what was loaded (all groups, or one), so the next registry call reads the entry points again
    (tests; a notebook after ``pip install``). Entries already registered stay registered."""
    for k in [kind] if kind else list(_RECORDS):
        _RECORDS.pop(k, None)
