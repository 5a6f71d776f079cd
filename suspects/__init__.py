"""The foundation of Backdoor Lens: models, datasets, triggers, metrics, training and checkpoint I/O.

A :class:`Suspect` is a model under investigation with what is needed to measure it; load one with
:func:`load` (a suspect folder, ``demo:NAME`` or a bare state dict).
"""

__version__ = "0.1.0"

from . import tv_resnet  # noqa: E402,F401  (registers resnet18_torchvision)
from .checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from .data import DatasetNotFoundError, DatasetPair, ImageSet, defense_pool_split, load_dataset  # noqa: E402
from .metrics import Metrics, der, evaluate  # noqa: E402
from .models import create_model, list_models, list_residual_blocks, set_skip_gamma  # noqa: E402
from .store import Suspect, SuspectLoadError, list_demo_suspects, load, save  # noqa: E402
from .triggers import list_triggers, make_trigger  # noqa: E402

__all__ = [
    "CheckpointError", "DatasetNotFoundError", "DatasetPair", "ImageSet", "Metrics", "Suspect", "SuspectLoadError",
    "create_model", "defense_pool_split", "der", "evaluate", "list_demo_suspects", "list_models",
    "list_residual_blocks", "list_triggers", "load", "load_dataset", "make_trigger", "save", "set_skip_gamma",
    "export_backdoorbench", "import_run", "load_checkpoint",
]

_LAZY = {"export_backdoorbench": "suspects.backdoorbench", "import_run": "suspects.backdoorbench"}


def __getattr__(name: str):
    """BackdoorBench's functions, imported on first use (``import suspects`` does not load that module)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'suspects' has no attribute {name!r}")
