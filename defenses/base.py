"""The one interface every defense implements, its parameters, and what it returns.

A defense takes a :class:`~suspects.Suspect` and returns a repaired model plus a report. Parameters are a
dataclass whose fields carry their paper names, units, ranges and help text (``param(...)``); the dashboard
renders them as widgets and the command line as ``--set name=value``. Every defense has two presets:
``quick`` (a live demo on a CPU) and ``paper`` (the official settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from suspects.params import ParamError, param, param_specs, params_from
from suspects.store import Suspect

from .context import Cancelled, DefensePool, Progress, RepairContext

__all__ = [
    "Defense",
    "DefenseOutput",
    "ThreatModel",
    "ParamError",
    "Cancelled",
    "param",
    "params_from",
    "param_specs",
    "Progress",
    "DefensePool",
    "RepairContext",
]


@dataclass
class ThreatModel:
    """What a defense needs: a clean pool of ``pool_images`` images, and/or the poisoned training set."""

    clean_pool: bool = True
    poisoned_training_set: bool = False
    trigger: bool = False
    note: str = ""

    def describe(self) -> str:
        parts = []
        if self.clean_pool:
            parts.append("a small clean pool (the defense pool)")
        if self.poisoned_training_set:
            parts.append("the poisoned training set")
        if self.trigger:
            parts.append("a trigger (known or recovered)")
        text = "needs " + " and ".join(parts) if parts else "needs nothing but the model"
        return text + (f"; {self.note}" if self.note else "")


@dataclass
class DefenseOutput:
    """What :meth:`Defense.repair` returns: the repaired model and the method's own artifacts and curves.

    Files a defense keeps with its run (e.g. DBD's stage-1 backbone) go to ``ctx.artifacts``, not here.
    """

    model: nn.Module
    artifacts: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)


class Defense:
    """Base class: subclasses set the class attributes and implement :meth:`repair`.

    The registry finds every subclass decorated with ``@register_defense`` in a module of the ``defenses``
    package; ``order`` sorts the listing (the paper's methods first, then the baselines, then anything added).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    order: ClassVar[int] = 1000
    threat: ClassVar[ThreatModel] = ThreatModel()
    Params: ClassVar[type] = object
    presets: ClassVar[dict[str, dict[str, Any]]] = {"quick": {}, "paper": {}}
    artifact_labels: ClassVar[dict[str, str]] = {}
    curve_labels: ClassVar[dict[str, str]] = {}  # curve name -> chart title on the Defenses page
    # parameters that may name an earlier run (its id, folder or the file itself) -> the file of that run they need;
    # whoever owns the run store resolves a run id to the file's path before the run, so a defense sees paths only
    run_files: ClassVar[dict[str, str]] = {}
    # what the defense needs from the model (names of suspects.models.CAPABILITIES); a model without one gets
    # "not applicable to this model: ..." on its card and from `defend`, never a traceback
    needs: ClassVar[tuple[str, ...]] = ("rebuildable", "trainable")

    def make_params(self, preset: str = "quick", overrides: dict[str, Any] | None = None) -> Any:
        if preset not in self.presets:
            raise ParamError(f"{self.name}: unknown preset {preset!r}; presets: {sorted(self.presets)}")
        return params_from(self.Params, {**self.presets[preset], **(overrides or {})})

    def not_applicable(self, model: nn.Module) -> str | None:
        """Why this defense cannot run on ``model`` (what the model lacks), or None when it can."""
        from suspects.models import not_applicable_reason

        reason = not_applicable_reason(model, self.needs)
        return f"{self.title}: {reason}" if reason else None

    def threat_for(self, params: Any | None = None) -> ThreatModel:
        """What the defense needs when run with ``params`` (None: with its least demanding settings, the card's
        :attr:`threat`). A defense whose needs depend on a parameter overrides this (shortcut suppression needs a
        trigger only to choose its block)."""
        return self.threat

    def trigger_needs(self) -> bool | str:
        """Whether the defense stamps a trigger on pool images: True when its threat model always needs one, else the
        presets that do (``"the paper preset"``), else False."""
        if self.threat.trigger:
            return True
        needing = [p for p in self.presets if self.threat_for(self.make_params(p)).trigger]
        if not needing:
            return False
        return f"the {', '.join(needing)} preset{'s' if len(needing) > 1 else ''}"

    def check_applicable(self, suspect: Suspect, params: Any | None = None) -> None:
        """Raise ValueError when the model lacks what the defense needs
        (:class:`~suspects.models.NotApplicableError`) or the suspect what the threat model needs, run with
        ``params`` (None: the card's threat model, :meth:`threat_for`)."""
        reason = self.not_applicable(suspect.model)
        if reason:
            from suspects.models import NotApplicableError

            raise NotApplicableError(reason)
        threat = self.threat_for(params)
        if threat.poisoned_training_set:
            poison = suspect.card.get("poison")
            if not poison or suspect.trigger is None:
                raise ValueError(f"{self.title} needs the suspect's poisoned training set, which is not known for "
                                 f"{suspect.name!r}")
        if threat.trigger and suspect.trigger is None:
            raise ValueError(f"{self.title} needs a trigger (known or recovered) and {suspect.name!r} has none"
                             + (f" ({threat.note})" if threat.note else ""))
        if threat.trigger:
            from analysis.applicability import trigger_function_gaps

            gap = trigger_function_gaps(suspect.trigger, [(self.name, True)]).get(self.name)
            if gap:  # a stored trigger (BackdoorBench import) of a sample-specific attack: its own images only
                from suspects.models import NotApplicableError

                raise NotApplicableError(f"{self.title}: {gap.removeprefix('no: ')} ({suspect.name!r} has only the "
                                         f"attack's stored poisoned images)")

    def repair(self, model: nn.Module, params: Any, ctx: RepairContext) -> DefenseOutput:
        """Return the repaired model. ``model`` is a copy of the suspect's model on ``ctx.device``; everything else
        (suspect, defense pool, trigger, progress and cancellation, the run's artifacts folder) is in ``ctx``."""
        raise NotImplementedError
