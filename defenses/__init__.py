"""Defenses behind one interface, and the runner that measures them (the run store and job queue are in ``runs``).

>>> from defenses import list_defenses, run_defense
>>> report = run_defense("finetune", suspects.load("demo:badnets"), preset="quick")
"""

from .base import Defense, DefenseOutput, ParamError, ThreatModel, param_specs  # noqa: F401
from .context import Cancelled, DefensePool, RepairContext  # noqa: F401
from .registry import all_defenses, get_defense, list_defenses  # noqa: F401
from .runner import defense_pool, run_defense  # noqa: F401
