"""Which view and which defense applies to which model: one table, computed from what each one declares it needs.

Views list their needs here (:data:`VIEW_NEEDS`); defenses on their class (``Defense.needs``). Both read
:func:`suspects.models.missing_capabilities`, so the dashboard, the CLI and ``docs/bring-your-own-model.md`` (written
by ``scripts/model_table.py``) say the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from suspects.models import missing_capabilities

__all__ = ["VIEW_NEEDS", "applicability_row"]

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
