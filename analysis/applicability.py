"""Which view and which defense applies to which model: one table, computed from what each one declares it needs.

Views list their needs here (:data:`VIEW_NEEDS`); defenses on their class (``Defense.needs``). Both read
:func:`suspects.models.missing_capabilities`, so the dashboard, the CLI and ``docs/bring-your-own-model.md`` (written
by ``scripts/model_table.py``) say the same thing.

Beside the model, one need concerns the suspect's trigger: a *trigger function*
(:data:`suspects.stored_trigger.TRIGGER_FUNCTION`), one that stamps the trigger on any image. A BackdoorBench
import of a sample-specific attack (input-aware, WaNet, BppAttack) has only the run's stored poisoned copies of its
own images; :data:`TRIGGER_FUNCTION_USES` (views and measurements) and the defenses whose threat model needs a trigger
(``ThreatModel.trigger``: they stamp it on defense-pool images) say what is unavailable or limited then
(:func:`trigger_function_gaps`, listed by ``backdoor-lens import-backdoorbench``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from suspects.models import missing_capabilities
from suspects.stored_trigger import TRIGGER_FUNCTION, has_trigger_function
from suspects.triggers import Trigger

__all__ = ["VIEW_NEEDS", "applicability_row", "TRIGGER_FUNCTION_USES", "trigger_function_gaps"]

VIEW_NEEDS: dict[str, tuple[str, ...]] = {
    "BA / ASR": (),
    "Grad-CAM": ("module_hooks",),
    "activations": ("module_hooks",),
    "feature space": ("module_hooks", "linear_head"),
    "skip ablation": ("module_hooks", "residual_blocks"),
    "Neural Cleanse": (),
}


def applicability_row(model: nn.Module, defenses: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str]:
    """``{column: "yes" | "no: <what is missing>"}`` for every view and every ``(defense name, needs)``."""
    row: dict[str, str] = {}
    for name, needs in [*VIEW_NEEDS.items(), *defenses]:
        missing = missing_capabilities(model, needs)
        row[name] = "yes" if not missing else "no: " + ", ".join(m.replace("_", " ") for m in missing)
    return row


#: views and measurements that stamp the trigger on images other than the attack's own test and training images:
#: name -> ("no" | "limited", what is lost with a trigger that has no trigger function)
TRIGGER_FUNCTION_USES: dict[str, tuple[str, str]] = {
    "held-out pool ASR": ("limited", "every defense's held-out defense-pool ASR (its progress and its result) is not "
                                     "measured; BA / ASR / RA on the test split are (its poisoned copies are stored)"),
    "stress test": ("limited", "its poisoned samples can only be the run's stored poisoned training images "
                               "(poison_source 'attack' or 'auto'): poison_source 'pool' is unavailable, and so is the "
                               "whole test when the run stores no poisoned training images"),
    "Neural Cleanse": ("limited", "the known trigger's footprint, which the recovered masks are compared with, is the "
                                  "pixels the stored copies change in at least half of the images, not one image's "
                                  "trigger"),
}


def trigger_function_gaps(trigger: Trigger | None, defenses: Sequence[tuple[str, bool | str]]) -> dict[str, str]:
    """``{view or defense: "no: <why>" | "limited: <what>"}`` for what needs a trigger function that ``trigger``
    lacks (empty when it has one, or there is no trigger). ``defenses``: ``(name, stamps)`` per defense: ``True``
    when its threat model always needs a trigger (it stamps it on defense-pool images and is not applicable), a
    text naming the settings that need one (e.g. "the paper preset": limited), or ``False``."""
    if trigger is None or has_trigger_function(trigger):
        return {}
    need = TRIGGER_FUNCTION["trigger_function"]
    out = {name: f"{effect}: {what}" for name, (effect, what) in TRIGGER_FUNCTION_USES.items()}
    for name, stamps in defenses:
        if stamps is True:
            out[name] = f"no: not applicable to this trigger: it stamps the trigger on defense-pool images and needs {need}"
        elif stamps:
            out[name] = (f"limited: {stamps} stamps the trigger on defense-pool images and is not applicable "
                         f"(it needs {need}); its other settings run")
    return out
