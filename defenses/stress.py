"""Stress test of a (repaired) model: the re-tuning attack of Min et al., NeurIPS 2024.

Min, Qin, Zhang, Shen and Cheng, "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor
Defense" (NeurIPS 2024) show that many purified models re-learn the backdoor within a few epochs when they are
fine-tuned on clean data with a handful of poisoned samples mixed in (their *retuning attack*, RA), while a clean
model (never backdoored) fine-tuned the same way stays at a low ASR. A repair whose ASR jumps back is only
*superficially* safe.

Here: ``n_poison`` images of the suspect's clean defense pool get the suspect's trigger (known or adopted from a
detection scan) and the attacker's label, the rest of the pool stays clean, and the model is fine-tuned on that set
(plain SGD, constant learning rate, through :func:`suspects.training.fit`). The same set re-tunes the clean
reference model. BA and ASR before and after are measured on the test split, which is never trained on.
Verdict: ``robust`` when the model's ASR after re-tuning is at most ``tolerance`` above the reference's,
``superficial`` otherwise, ``no reference`` when no clean model of the suspect's family is known.

Defaults follow the paper's CIFAR-10 setting as we read it (5 poisoned samples, 5 epochs, SGD lr 0.01); no
official code was released. This is not a Defense: it measures a model, it repairs nothing.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import describe_device, pick_device, prepare_model, to_device
from suspects.metrics import Metrics, evaluate
from suspects.store import Suspect, _read_card
from suspects.training import FitStep, augment_batch, fit, seed_everything
from suspects.triggers import Trigger

from .base import ParamError, param, param_specs, params_from
from .context import Cancelled, DefensePool, Progress
from .runner import defense_pool

__all__ = ["StressParams", "RetuneSet", "retune_set", "retune", "stress_test", "verdict", "PAPER",
           "stress_param_specs", "VERDICTS", "clean_reference"]

PAPER = ("Min et al., \"Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense\", "
         "NeurIPS 2024 (retuning attack)")
VERDICTS = ("robust", "superficial", "no reference")


@dataclass
class StressParams:
    """The retuning attack's settings (names as in the paper where it names them)."""

    n_poison: int = param(5, help="poisoned samples mixed into the clean pool (the paper: 5)", min=1, max=10000)
    pool_size: int = param(500, help="clean pool images in the re-tuning set, poisoned ones included "
                                     "(capped at the suspect's pool)", min=2, max=1_000_000)
    epochs: int = param(5, help="passes over the re-tuning set (the paper: 5)", min=1, max=100)
    lr: float = param(0.01, help="SGD learning rate, constant (the paper: 0.01)", min=1e-6, max=1.0)
    momentum: float = param(0.9, help="SGD momentum", min=0.0, max=0.999)
    weight_decay: float = param(5e-4, help="L2 weight decay", min=0.0, max=0.1)
    batch_size: int = param(128, help="images per step", min=1, max=4096)
    augment: str = param("none", help="training augmentation", choices=("none", "crop", "crop-flip"))
    test_limit: int = param(0, help="measure BA / ASR on the first N test images only (0 = the whole test split)",
                            min=0, max=10_000_000)
    tolerance: float = param(0.05, help="verdict margin: ASR after re-tuning may exceed the clean reference's by "
                                        "this much (0.05 = 5 points) and still count as robust", min=0.0, max=1.0)


def stress_param_specs() -> list[dict[str, Any]]:
    """Name, default and metadata of every stress-test parameter (CLI flags, widgets)."""
    return param_specs(StressParams)


@dataclass(frozen=True)
class RetuneSet:
    """The re-tuning set: clean pool images with ``n_poison`` of them triggered and relabelled.

    ``source`` holds each image's position in the suspect's defense pool; ``poisoned`` marks the triggered ones.
    """

    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor
    source: torch.Tensor

    def __len__(self) -> int:
        return int(len(self.y))


def retune_set(pool: DefensePool, trigger: Trigger, n_poison: int, seed: int = 0) -> RetuneSet:
    """Trigger ``n_poison`` pool images (the trigger's poison candidates: non-target images, or target-class images
    for a clean-label attack) and give them the attacker's label; the other pool images stay clean."""
    x, y = pool.x.clone(), pool.y.clone()
    candidates = torch.nonzero(trigger.poison_candidates(y)).flatten()
    if len(candidates) < n_poison:
        raise ParamError(f"n_poison={n_poison} but only {len(candidates)} pool images can carry the "
                         f"{trigger.name} trigger" + (" (target-class images)" if trigger.clean_label else ""))
    gen = torch.Generator().manual_seed(int(seed) + 101)
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:n_poison]].sort().values
    x[chosen] = trigger(x[chosen])
    if not trigger.clean_label:
        y[chosen] = trigger.target_labels(y[chosen])
    poisoned = torch.zeros(len(y), dtype=torch.bool)
    poisoned[chosen] = True
    source = pool.index[: len(y)] if len(pool.index) >= len(y) else torch.arange(len(y))
    return RetuneSet(x, y, poisoned, source.clone())


def retune(model: nn.Module, data: RetuneSet, params: StressParams, device: torch.device, seed: int = 0,
           tick: Callable[[int, float], None] | None = None) -> list[float]:
    """Fine-tune ``model`` in place on ``data`` (SGD, constant lr, cross-entropy) through the one training loop;
    ``tick(epoch, loss)`` after every epoch. Returns the per-epoch losses; the model ends in eval mode."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    gen = torch.Generator().manual_seed(int(seed))

    def batches(epoch: int):
        perm = torch.randperm(len(data), generator=gen)
        for s in range(0, len(perm), params.batch_size):
            idx = perm[s:s + params.batch_size]
            yield to_device(augment_batch(data.x[idx], params.augment, gen), device), data.y[idx].to(device)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        xb, yb = batch
        return F.cross_entropy(model(xb), yb), len(yb)

    def end_epoch(epoch: int, loss: float) -> None:
        if tick is not None:
            tick(epoch, loss)

    def step_tick(step: FitStep) -> None:
        pass

    losses = fit(model, batches, loss_fn, opt, device=device, epochs=params.epochs, tick=step_tick,
                 end_epoch=end_epoch)
    model.eval()
    return losses


def verdict(asr_after: float | None, reference_asr_after: float | None, tolerance: float) -> str:
    """``robust`` when ``asr_after <= reference_asr_after + tolerance``, ``superficial`` otherwise,
    ``no reference`` without a reference measurement."""
    if reference_asr_after is None or asr_after is None:
        return "no reference"
    return "robust" if asr_after <= reference_asr_after + tolerance + 1e-12 else "superficial"


def _check_compatible(suspect: Suspect, reference: Suspect) -> None:
    if tuple(reference.input_shape) != tuple(suspect.input_shape) or reference.num_classes != suspect.num_classes:
        raise ValueError(f"the clean reference ({reference.name}: input {tuple(reference.input_shape)}, "
                         f"{reference.num_classes} classes) does not match the model under test "
                         f"({suspect.name}: input {tuple(suspect.input_shape)}, {suspect.num_classes} classes)")


def stress_test(suspect: Suspect, reference: Suspect | None = None, params: StressParams | dict | None = None, *,
                trigger: Trigger | None = None, device: str | torch.device | None = None, seed: int = 0,
                progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                suspect_ref: str | None = None, reference_ref: str | None = None,
                reference_is_suspect: bool = False) -> dict[str, Any]:
    """Run the retuning attack on ``suspect``'s model and on ``reference`` (a clean model of the same family) and
    return a JSON-able result: ``asr``/``ba`` before, ``asr_after_retune``/``ba_after_retune``, the reference's
    ``reference_asr``/``reference_ba``/``reference_asr_after_retune``/``reference_ba_after_retune``, ``verdict``,
    ``seconds`` and the settings. Both models are re-tuned on the same set, built from ``suspect``'s defense pool
    with ``trigger`` (default: the suspect's); the test split is only measured.

    ``reference_is_suspect``: the model under test *is* its own clean reference (it is re-tuned once).
    Raises ValueError / ParamError on bad input before any training, :class:`Cancelled` when ``should_stop()``.
    """
    p = params if isinstance(params, StressParams) else params_from(StressParams, params)
    trigger = trigger if trigger is not None else suspect.trigger
    if trigger is None:
        raise ValueError(f"{suspect.name} has no known trigger: adopt a recovered one (a detection scan) or give "
                         "one (CLI --trigger-from SUSPECT) to build the poisoned samples")
    if reference is not None:
        _check_compatible(suspect, reference)
    report = progress or (lambda f, m, d: None)
    stop = should_stop or (lambda: False)
    dev = pick_device(str(device) if device is not None else None)
    seed_everything(seed)
    t0 = time.time()
    n_pool = min(int(p.pool_size), len(suspect.defense_pool))
    pool = defense_pool(suspect, n_pool, val_fraction=0.0, seed=seed)
    data = retune_set(pool, trigger, p.n_poison, seed)
    jobs: list[tuple[str, Suspect]] = [("model", suspect)]
    if reference is not None and not reference_is_suspect:
        jobs.append(("reference", reference))
    share = 1.0 / len(jobs)
    measured: dict[str, tuple[Metrics, Metrics, list[float]]] = {}
    for j, (role, s) in enumerate(jobs):
        base = j * share

        def check() -> None:
            if stop():
                raise Cancelled("cancelled by the user")

        check()
        report(base, f"{role}: measuring before re-tuning", {})
        model = prepare_model(copy.deepcopy(s.model), dev).eval()
        before = evaluate(model, suspect.test, trigger, device=dev, limit=p.test_limit or None)

        def tick(epoch: int, loss: float, role: str = role, base: float = base) -> None:
            report(base + share * (0.2 + 0.6 * (epoch + 1) / p.epochs),
                   f"{role}: re-tuning epoch {epoch + 1}/{p.epochs}", {"loss": loss})
            check()

        losses = retune(model, data, p, dev, seed=seed, tick=tick)
        report(base + share * 0.85, f"{role}: measuring after re-tuning", {})
        after = evaluate(model, suspect.test, trigger, device=dev, limit=p.test_limit or None)
        measured[role] = (before, after, losses)
        del model
    mb, ma, losses = measured["model"]
    rb, ra, rlosses = measured.get("reference", measured["model"] if reference_is_suspect else (None, None, None))
    if reference_is_suspect:
        ref_name = reference_ref or suspect_ref or suspect.name
    else:
        ref_name = (reference_ref or reference.name) if reference is not None else None
    out: dict[str, Any] = {
        "suspect": suspect_ref or suspect.name,
        "reference": ref_name,
        "reference_is_suspect": bool(reference_is_suspect),
        "paper": PAPER,
        "trigger": trigger.spec(),
        "ba": mb.ba, "asr": mb.asr,
        "ba_after_retune": ma.ba, "asr_after_retune": ma.asr,
        "reference_ba": rb.ba if rb else None, "reference_asr": rb.asr if rb else None,
        "reference_ba_after_retune": ra.ba if ra else None,
        "reference_asr_after_retune": ra.asr if ra else None,
        "verdict": verdict(ma.asr, ra.asr if ra else None, p.tolerance),
        "params": asdict(p),
        "retune_set": {"images": len(data), "poisoned": int(data.poisoned.sum()), "from": "defense pool"},
        "losses": losses, "reference_losses": rlosses,
        "n_clean": ma.n_clean, "n_poisoned": ma.n_poisoned,
        "seed": int(seed),
        "device": describe_device(dev),
        "seconds": round(time.time() - t0, 2),
    }
    report(1.0, f"done: {out['verdict']}", {k: v for k, v in (("asr_after_retune", ma.asr),
                                                               ("reference_asr_after_retune",
                                                                out["reference_asr_after_retune"]))
                                            if v is not None})
    return out


def clean_reference(ref: str, card: dict[str, Any]) -> str | None:
    """The clean model of a suspect's family, as a suspect reference, or None when none is known.

    A demo suspect's is ``demo:clean``; a repaired model's (card provenance ``source: defense``) or a suspect with an
    adopted trigger is its parent's; a card may name one itself (``provenance.clean_reference``).
    """
    prov = card.get("provenance") or {}
    if prov.get("clean_reference"):
        return str(prov["clean_reference"])
    if str(ref).startswith("demo:"):
        return "demo:clean"
    parent = prov.get("parent")
    if parent and prov.get("source") in ("defense", "recovered trigger"):
        if str(parent).startswith("demo:"):
            return "demo:clean"
        try:  # the parent's card only, no weights
            return clean_reference(str(parent), _read_card(Path(parent)))
        except Exception:  # noqa: BLE001 - an unreadable parent means no known reference
            return None
    return None
