"""What a defense works with: the typed defense pool and the repair context.

Every defense implements ``repair(self, model, params, ctx) -> DefenseOutput``. ``ctx`` carries everything
else: the suspect (its card and trigger; never its test split), the :class:`DefensePool`, the device, the
seed, ``ctx.tick(fraction, message, metrics)`` (progress; raises :class:`Cancelled` when the user cancels), and
``ctx.artifacts``, a folder the run owns (DBD keeps its backbone there). No defense imports the run store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from suspects.store import Suspect

__all__ = ["DefensePool", "RepairContext", "Cancelled", "Progress"]

Progress = Callable[[float, str, dict], None]


class Cancelled(RuntimeError):
    """The user cancelled the run."""


@dataclass(frozen=True)
class DefensePool:
    """Clean images a defense may use: a part it trains on and a held-out part for stopping and selection rules.

    Drawn from the suspect's defense pool, never from the test split. ``index`` holds the pool positions drawn.
    """

    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def n_train(self) -> int:
        return int(len(self.y))

    @property
    def n_held_out(self) -> int:
        return int(len(self.y_val))

    def __len__(self) -> int:
        return self.n_train + self.n_held_out


def _never() -> bool:
    return False


def _silent(fraction: float, message: str, metrics: dict) -> None:
    pass


@dataclass
class RepairContext:
    """The world a defense's ``repair`` sees; built by :func:`defenses.runner.run_defense`.

    Cancellation: :meth:`tick` always asks ``should_stop``; :meth:`check_cancel` (for inner loops) asks it at most
    every ``poll_interval`` seconds, since asking may cost a database query (the job queue's cancel flag).
    """

    suspect: Suspect
    pool: DefensePool
    device: torch.device
    seed: int = 0
    artifacts: Path | None = None
    progress: Progress = _silent
    should_stop: Callable[[], bool] = _never
    poll_interval: float = 0.2
    _last_poll: float = field(default=float("-inf"), init=False, repr=False)

    @property
    def trigger(self):
        """The suspect's trigger (known or adopted from a detection scan), or None."""
        return self.suspect.trigger

    def cancelled(self) -> bool:
        return bool(self.should_stop())

    def _poll(self) -> None:
        self._last_poll = time.monotonic()
        if self.should_stop():
            raise Cancelled("cancelled by the user")

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` if the user asked to stop (call it inside long inner loops)."""
        if time.monotonic() - self._last_poll >= self.poll_interval:
            self._poll()

    def tick(self, fraction: float, message: str, metrics: dict | None = None) -> None:
        """Report progress (fraction of this defense's work in [0, 1]); raise :class:`Cancelled` on cancel."""
        self.progress(min(max(float(fraction), 0.0), 1.0), message, dict(metrics or {}))
        self._poll()

    def artifact_dir(self) -> Path:
        """The run's own folder for files a defense keeps (created on first use)."""
        if self.artifacts is None:
            raise RuntimeError("this run has no artifacts folder")
        self.artifacts.mkdir(parents=True, exist_ok=True)
        return self.artifacts
