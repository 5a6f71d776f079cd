"""Trigger reverse-engineering: Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor
Attacks in Neural Networks", IEEE S&P 2019), with the official implementation's cost schedule.

For each candidate target class t, optimise a mask m (H x W, in [0, 1]) and a pattern p (C x H x W, in [0, 1]) so
that clean images stamped as (1 - m) * x + m * p are classified as t, with the smallest mask:

    min  CE(f((1 - m) x + m p), t) + lambda * |m|_1

The schedule of lambda is the official one (bolunwang/backdoor, ``visualizer.py``; re-implemented here, not copied):

* lambda starts at 0; once the reversed trigger succeeds on >= 99% of an epoch's images for ``patience`` (5)
  consecutive epochs it is set to ``init_cost`` (1e-3);
* afterwards, ``patience`` consecutive epochs at >= 99% multiply it by ``cost_multiplier`` (2), ``patience``
  consecutive epochs below divide it by ``cost_multiplier ** 1.5``;
* the kept mask of a class is the smallest-norm one seen at the end of an epoch whose success was >= 99%;
* early stop: once lambda has gone both up and down and the best norm has not improved for
  ``early_stop_patience`` (25 = 5 x patience) epochs.

An "epoch" (the official code's "step") is ``mini_batches`` Adam updates (lr 0.1, betas 0.5/0.9) on batches of
``batch_size`` images; its success rate is the share of the stamped images of those batches classified as t.
Mask and pattern start at uniform random values (seeded) and are optimised in tanh space.

**Success counts only images whose true class is not t** (the attack success rate's definition; the official example
used every test image, so target-class images counted as free successes). Optimisation, the 99% test and the
reported success of the kept mask all use the scan images of the other classes.

**Convergence.** A class *converged* when some epoch's success (the share of that epoch's stamped batches classified
as t, measured while the mask is being optimised: the official rule) reached ``success_threshold`` (99%); its kept
mask is the one of such an epoch, and that epoch's success is reported as ``epoch_success`` (>= 99% for every
converged class, NaN for the others). ``success`` is the kept mask re-measured once on all the scan images of the
other classes: it can fall a little below 99% (the epoch's rate was measured on 32 images while the mask still moved),
so it is shown beside ``epoch_success``, never as the convergence test. A class that never converged has no kept mask:
its mask L1 is reported as NaN (never as a small or large norm) and it is left out of the MAD statistics.

**Scope.** Neural Cleanse looks for the smallest *patch* that flips images to a class. A trigger that changes the
whole image (a blended image, SIG's sinusoidal signal, WaNet's warp) has no small patch to find, so a scan of such a
model usually says "nothing stands out" (:func:`scope_note` says so wherever that verdict is shown). A
sample-specific trigger (:data:`SAMPLE_SPECIFIC_TRIGGERS`: input-aware, WaNet, BppAttack, Adaptive-Blend) breaks
the method's assumption of one input-agnostic mask and pattern for every image, whatever the verdict.

**Anomaly index** (the official ``mad_outlier_detection.py``): over the converged classes,
(median - l1_t) / (1.4826 * MAD); a class is flagged when its index exceeds ``threshold`` (2) on the small-norm side.

**Verdict** (:class:`Verdict`), four levels:

* ``flagged``: some converged class has anomaly index > threshold on the small side (kind ``error``);
* ``suspicious``: nothing is flagged, but the smallest converged mask stands out: its L1 is below
  ``SUSPICIOUS_RATIO`` (1/3) of the median, or below ``SUSPICIOUS_GAP`` (1/2) of the second smallest (first by a
  clear gap). A single very large mask widens the MAD and can hide a real target under the threshold (issue 17:
  anomaly index 1.87 for a target whose mask was 5x smaller than the median) (kind ``warning``);
* ``clean``: nothing stands out (kind ``info``; never a success colour: Neural Cleanse misses many attacks);
* ``inconclusive``: fewer than half of the classes (or fewer than 3) converged (kind ``warning``).

The default budget (:class:`ScanConfig`) is sized for CPUs: at most 80 epochs of 4 batches of 8 images per class
(2,560 stamped images, 320 Adam steps); the official example used up to 1,000 epochs of ~31 batches of 32. See
docs/detection.md for the measured times and detection numbers.

This module is the algorithm only; storing scans once per (weights, data, budget) and saving a suspect that adopts
a recovered trigger live in :mod:`runs.scans`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import to_device
from suspects.metrics import model_fingerprint  # the one fingerprint of a model's weights (scan cache keys)

__all__ = ["ReverseResult", "ScanConfig", "CostSchedule", "ClassResult", "Verdict", "reverse_engineer_class",
           "neural_cleanse", "anomaly_indices", "verdict", "reference_scan", "reference_indices",
           "scan_suspect", "model_fingerprint", "trigger_overlap", "known_trigger_overlap", "known_footprint_share",
           "OVERLAP_IMAGES", "recovered_trigger_spec",
           "scan_images", "scan_data", "scope_note", "FULL_IMAGE_SHARE", "SAMPLE_SPECIFIC_TRIGGERS",
           "SUSPICIOUS_RATIO", "SUSPICIOUS_GAP"]

Progress = Callable[[float, str, dict], None]

#: "suspicious" when the smallest converged mask is below this share of the median mask L1 ...
SUSPICIOUS_RATIO = 1 / 3
#: ... or below this share of the second-smallest converged mask L1 (first by a clear gap).
SUSPICIOUS_GAP = 0.5
#: MAD consistency constant for normally distributed norms (as the paper).
MAD_CONSTANT = 1.4826


@dataclass
class ScanConfig:
    """The scan's settings and budget (names follow the official code).

    Budget: per class at most ``steps`` epochs of ``mini_batches`` Adam updates on ``batch_size`` images, drawn from
    ``n_images`` clean defense-pool images (those of the scanned class are left out). The defaults (300 images,
    80 epochs x 4 batches x 8 images = 2,560 stamped images per class) are sized so that a full-width CIFAR-10
    PreAct-ResNet-18 scan (10 classes) stays under 20 minutes on 2 CPU cores; small batches give many Adam steps
    (320 per class) for that cost, and a 32-image epoch is what the 99% test and the patience count. The official
    example used up to 1,000 epochs of ~31 batches of 32. Measured numbers: docs/detection.md.

    Schedule: ``init_cost`` (lambda once the attack first succeeds), ``patience`` (epochs), ``cost_multiplier`` (up;
    down is its 1.5th power), ``success_threshold`` (0.99), ``early_stop_patience`` (epochs without a smaller kept
    mask, after lambda went both up and down). ``lr``: Adam's learning rate (betas 0.5, 0.9). ``threshold``: the
    anomaly index above which a class is flagged. ``seed``: image choice and the random mask/pattern start.
    """

    n_images: int = 300
    steps: int = 80
    mini_batches: int = 4
    batch_size: int = 8
    lr: float = 0.1
    init_cost: float = 1e-3
    patience: int = 5
    cost_multiplier: float = 2.0
    success_threshold: float = 0.99
    early_stop_patience: int = 25
    threshold: float = 2.0
    seed: int = 0

    def check(self) -> None:
        if not 10 <= self.n_images <= 100_000:
            raise ValueError(f"n_images must lie in [10, 100000], got {self.n_images}")
        if not 1 <= self.steps <= 100_000:
            raise ValueError(f"steps must lie in [1, 100000], got {self.steps}")
        if not (1 <= self.mini_batches <= 10_000 and 1 <= self.batch_size <= 4096):
            raise ValueError(f"mini_batches must lie in [1, 10000] and batch_size in [1, 4096], got "
                             f"{self.mini_batches}, {self.batch_size}")
        if not (0 < self.lr <= 10 and 0 < self.init_cost <= 10):
            raise ValueError(f"lr must lie in (0, 10] and init_cost in (0, 10], got lr={self.lr}, "
                             f"init_cost={self.init_cost}")
        if not (1 <= self.patience <= 1000 and 1 <= self.early_stop_patience <= 100_000):
            raise ValueError("patience and early_stop_patience must be at least 1")
        if not (self.cost_multiplier > 1 and 0 < self.success_threshold <= 1):
            raise ValueError("cost_multiplier must exceed 1 and success_threshold lie in (0, 1]")
        if not 0 < self.threshold <= 100:
            raise ValueError(f"threshold must lie in (0, 100], got {self.threshold}")

    @property
    def images_per_class(self) -> int:
        """The budget in stamped images optimised on per class (forward and backward passes)."""
        return self.steps * self.mini_batches * self.batch_size

    def schedule(self) -> CostSchedule:
        return CostSchedule(init_cost=self.init_cost, patience=self.patience, multiplier_up=self.cost_multiplier,
                            multiplier_down=self.cost_multiplier ** 1.5, success_threshold=self.success_threshold,
                            early_stop_patience=self.early_stop_patience)


@dataclass
class CostSchedule:
    """Neural Cleanse's adaptive lambda, fed one epoch at a time with :meth:`update` (official ``visualizer.py``).

    ``cost`` is the current lambda; ``best`` the smallest epoch-mean mask L1 among epochs with success >= the
    threshold (``inf`` until one succeeds). :meth:`update` returns ``(improved, stop)``: whether this epoch's mask is
    the new kept one, and whether to stop early.
    """

    init_cost: float = 1e-3
    patience: int = 5
    multiplier_up: float = 2.0
    multiplier_down: float = 2.0 ** 1.5
    success_threshold: float = 0.99
    early_stop_patience: int = 25
    early_stop_threshold: float = 1.0
    cost: float = 0.0
    best: float = math.inf
    went_up: bool = False
    went_down: bool = False
    _set_count: int = 0
    _up_count: int = 0
    _down_count: int = 0
    _stall_count: int = 0
    _stall_best: float = math.inf

    def update(self, success: float, reg: float) -> tuple[bool, bool]:
        ok = success >= self.success_threshold
        improved = ok and reg < self.best
        if improved:
            self.best = reg
        # early stop: the kept norm stalled after lambda has moved both ways
        if self.best < math.inf:
            self._stall_count = self._stall_count + 1 if self.best >= self.early_stop_threshold * self._stall_best else 0
        self._stall_best = min(self._stall_best, self.best)
        stop = self.went_up and self.went_down and self._stall_count >= self.early_stop_patience
        if stop:
            return improved, True
        # lambda = 0 until the attack has succeeded for `patience` epochs in a row, then init_cost
        if self.cost == 0 and ok:
            self._set_count += 1
            if self._set_count >= self.patience:
                self.cost = self.init_cost
                self._up_count = self._down_count = 0
                self.went_up = self.went_down = False
        else:
            self._set_count = 0
        # then up by the multiplier after `patience` successful epochs, down by multiplier ** 1.5 after failing ones
        if ok:
            self._up_count, self._down_count = self._up_count + 1, 0
        else:
            self._up_count, self._down_count = 0, self._down_count + 1
        if self._up_count >= self.patience:
            self._up_count = 0
            self.cost *= self.multiplier_up
            self.went_up = True
        elif self._down_count >= self.patience:
            self._down_count = 0
            self.cost /= self.multiplier_down
            self.went_down = True
        return improved, False


@dataclass
class ClassResult:
    """One class's reverse engineering: the kept (or, when not converged, the last) mask and pattern."""

    target: int
    mask: np.ndarray
    pattern: np.ndarray
    l1: float  # the kept mask's L1 norm; NaN when the class did not converge
    success: float  # the returned mask re-measured on all the scan images of the other classes
    converged: bool  # some epoch reached the success threshold
    epochs: int  # epochs run (fewer than the budget after an early stop)
    cost: float  # lambda at the end
    epoch_success: float = float("nan")  # the success of the epoch whose mask was kept (>= threshold; NaN if none)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with its weights frozen (no weight gradients), restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def _to_param(v: torch.Tensor) -> torch.Tensor:
    """Inverse of (tanh(theta) + 1) / 2, clipped away from +-1 so random starts stay finite."""
    return torch.atanh((2 * v - 1).clamp(-1 + 1e-4, 1 - 1e-4))


def _from_param(theta: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(theta) + 1) / 2


def _success(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor, target: int,
             device: torch.device) -> float:
    if len(x) == 0:
        return float("nan")
    hits = 0
    with torch.no_grad():
        for s in range(0, len(x), 256):
            xb = to_device(x[s:s + 256], device)
            hits += int((model((1 - mask) * xb + mask * pattern).argmax(1) == target).sum())
    return hits / len(x)


def reverse_engineer_class(model: nn.Module, x: torch.Tensor, target: int, config: ScanConfig | None = None,
                           should_stop: Callable[[], bool] | None = None,
                           on_epoch: Callable[[int, dict], None] | None = None) -> ClassResult:
    """Optimise class ``target``'s (mask, pattern) on ``x``, images whose true class is NOT ``target``.

    Runs the official cost schedule (see the module docstring) for at most ``config.steps`` epochs;
    ``on_epoch(epoch, metrics)`` is called after each. ``should_stop`` is polled every batch (``InterruptedError``).
    """
    with _frozen(model):
        return _reverse_engineer_class(model, x, target, config or ScanConfig(), should_stop, on_epoch)


def _reverse_engineer_class(model: nn.Module, x: torch.Tensor, target: int, config: ScanConfig,
                            should_stop: Callable[[], bool] | None,
                            on_epoch: Callable[[int, dict], None] | None) -> ClassResult:
    device = next(model.parameters()).device
    c, h, w = x.shape[1:]
    gen = torch.Generator().manual_seed(int(config.seed) * 100_003 + int(target))
    mask_param = _to_param(torch.rand((1, 1, h, w), generator=gen)).to(device).requires_grad_(True)
    pattern_param = _to_param(torch.rand((1, c, h, w), generator=gen)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_param, pattern_param], lr=config.lr, betas=(0.5, 0.9))
    sched = config.schedule()
    if len(x) == 0:  # no image of another class: nothing to flip, nothing to measure
        with torch.no_grad():
            m, p = _from_param(mask_param), _from_param(pattern_param)
        return ClassResult(int(target), m[0, 0].cpu().numpy(), p[0].cpu().numpy(), float("nan"), float("nan"),
                           False, 0, 0.0)
    kept: tuple[torch.Tensor, torch.Tensor] | None = None
    kept_success = float("nan")
    order = torch.randperm(len(x), generator=gen)
    pos, epoch = 0, 0
    for epoch in range(1, config.steps + 1):
        hits = seen = 0
        regs = []
        for _ in range(config.mini_batches):
            if should_stop is not None and should_stop():
                raise InterruptedError("cancelled")
            if pos >= len(order):
                order, pos = torch.randperm(len(x), generator=gen), 0
            idx = order[pos:pos + config.batch_size]
            pos += len(idx)
            xb = to_device(x[idx], device)
            m, p = _from_param(mask_param), _from_param(pattern_param)
            logits = model((1 - m) * xb + m * p)
            reg = m.sum()
            loss = F.cross_entropy(logits, torch.full((len(xb),), target, dtype=torch.long, device=device))
            loss = loss + sched.cost * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits += int((logits.detach().argmax(1) == target).sum())
            seen += len(xb)
            regs.append(float(reg.detach()))
        success, reg_mean = hits / max(seen, 1), float(np.mean(regs))
        improved, stop = sched.update(success, reg_mean)
        if improved:
            with torch.no_grad():
                kept = (_from_param(mask_param).detach().clone(), _from_param(pattern_param).detach().clone())
            kept_success = success
        if on_epoch is not None:
            on_epoch(epoch, {"lambda": sched.cost, "success": success, "l1": reg_mean,
                             "best_l1": sched.best if sched.best < math.inf else float("nan")})
        if stop:
            break
    with torch.no_grad():
        converged = kept is not None
        m, p = kept if kept is not None else (_from_param(mask_param), _from_param(pattern_param))
        success = _success(model, x, m, p, target, device)
    return ClassResult(int(target), m[0, 0].cpu().numpy(), p[0].cpu().numpy(),
                       float(m.sum()) if converged else float("nan"), success, converged, epoch, sched.cost,
                       kept_success)


def anomaly_indices(l1: np.ndarray) -> np.ndarray:
    """Signed anomaly index per class: (median - l1) / (1.4826 * MAD) over the finite (converged) norms;
    large positive = suspiciously small mask. Classes with NaN norms (not converged) get NaN."""
    l1 = np.asarray(l1, dtype=np.float64)
    ok = np.isfinite(l1)
    out = np.full(l1.shape, np.nan)
    if not ok.any():
        return out
    med = np.median(l1[ok])
    mad = MAD_CONSTANT * np.median(np.abs(l1[ok] - med))
    out[ok] = (med - l1[ok]) / max(mad, 1e-12)
    return out


@dataclass
class Verdict:
    """What a scan says, with its evidence. ``level``: flagged / suspicious / clean / inconclusive; ``kind``: the
    colour to show it in (error / warning / info: never a success colour, since a scan that finds nothing proves
    nothing); ``cls``: the class the evidence is about (None when no class converged)."""

    level: Literal["flagged", "suspicious", "clean", "inconclusive"]
    kind: Literal["error", "warning", "info"]
    title: str
    sentence: str
    cls: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.title}. {self.sentence}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(l1: np.ndarray, threshold: float = 2.0, classes: list[str] | None = None,
            ratio: float = SUSPICIOUS_RATIO, gap: float = SUSPICIOUS_GAP) -> Verdict:
    """The verdict on per-class mask norms (NaN = did not converge); see the module docstring for the levels."""
    l1 = np.asarray(l1, dtype=np.float64)
    n = len(l1)
    ok = np.isfinite(l1)
    n_ok = int(ok.sum())

    def name(k: int) -> str:
        return f"class {k} ({classes[k]})" if classes else f"class {k}"

    not_conv = [int(k) for k in np.nonzero(~ok)[0]]
    conv_note = (f" {len(not_conv)} of {n} classes did not converge (no mask reached the success threshold) and are "
                 f"left out of the statistics." if not_conv else "")
    if n_ok < max(3, math.ceil(n / 2)):
        return Verdict("inconclusive", "warning", "inconclusive",
                       f"Only {n_ok} of {n} classes converged (some epoch's stamped images of the other classes "
                       "were classified as the class at >= 99%), too few to compare mask norms. Raise the budget (more epochs or images).",
                       None, {"converged": n_ok, "not_converged": not_conv})
    ai = anomaly_indices(l1)
    med = float(np.median(l1[ok]))
    rank_order = [int(k) for k in np.argsort(np.where(ok, l1, np.inf))[:n_ok]]
    k = rank_order[0]
    second = float(l1[rank_order[1]])
    ev = {"class": k, "l1": float(l1[k]), "median": med, "ratio_to_median": float(l1[k] / med) if med > 0 else 0.0,
          "ratio_to_second": float(l1[k] / second) if second > 0 else 0.0, "rank": 1, "of": n_ok,
          "anomaly_index": float(ai[k]), "threshold": float(threshold), "not_converged": not_conv}
    flagged = [int(j) for j in rank_order if ai[j] > threshold]

    def evidence(j: int) -> str:
        return (f"{name(j)}: mask L1 {l1[j]:.1f}, {l1[j] / med:.2f}x the median {med:.1f}, rank "
                f"{rank_order.index(j) + 1} of {n_ok} (smallest first), anomaly index {ai[j]:.2f}")

    if flagged:
        ev["flagged"] = flagged
        return Verdict("flagged", "error", "backdoor suspected",
                       "; ".join(evidence(j) for j in flagged) + f" > {threshold:g}." + conv_note, flagged[0], ev)
    if ev["ratio_to_median"] < ratio or ev["ratio_to_second"] < gap:
        why = (f"{1 / max(ev['ratio_to_median'], 1e-12):.1f}x smaller than the median"
               if ev["ratio_to_median"] < ratio else
               f"{1 / max(ev['ratio_to_second'], 1e-12):.1f}x smaller than the next smallest ({second:.1f})")
        return Verdict("suspicious", "warning", "suspicious, not flagged",
                       f"{evidence(k)} <= {threshold:g}, but its mask is {why}. The other classes' spread of norms "
                       "keeps the index under the threshold; treat this class as a likely target." + conv_note, k, ev)
    return Verdict("clean", "info", "nothing stands out",
                   f"The smallest mask is {evidence(k)} <= {threshold:g}. Neural Cleanse misses triggers that are not "
                   "small patches (blended noise, warps, sample-specific triggers) more often, so this is not proof "
                   "of a clean model." + conv_note, k, ev)


#: a known trigger that changes more than this share of the image is a full-image trigger (as on the Grad-CAM view)
FULL_IMAGE_SHARE = 0.5


#: registered attacks whose trigger is not one input-agnostic mask and pattern (Neural Cleanse's assumption: the
#: same small patch flips every image to the target) -> what the trigger is instead
SAMPLE_SPECIFIC_TRIGGERS: dict[str, str] = {
    "inputaware": "a generator makes its own pattern and mask for every image (input-aware dynamic attack)",
    "wanet": "a smooth warp of the whole image, which moves every image's own pixels",
    "bppattack": "colour-depth quantisation of the whole image, a different small change in every image",
    "adaptive_blend": "a faint pattern blended over the whole image, learnt from randomly half-masked pieces of it",
}


def scope_note(level: str, footprint_share: float | None = None, trigger_name: str | None = None,
               attack: str | None = None, mapping: str = "all-to-one") -> str:
    """What Neural Cleanse cannot find, said beside a verdict that found nothing (``level`` ``clean``, "nothing
    stands out") or beside any verdict on a model whose known trigger changes the whole image (``footprint_share``
    of the pixels above :data:`FULL_IMAGE_SHARE`); empty otherwise. ``trigger_name``: the known attack's name.
    ``attack``: the known trigger's registered attack (``suspects.stored_trigger.attack_name``); a sample-specific
    one (:data:`SAMPLE_SPECIFIC_TRIGGERS`) gets its own note beside every verdict. ``mapping``: the known trigger's
    label mapping; an all-to-all backdoor (class y to (y + 1) mod K) has no single target class, which the method
    assumes, so it gets a note beside every verdict."""
    if mapping == "all-to-all":
        name = f" ({trigger_name or attack})" if (trigger_name or attack) else ""
        return (f"The known attack{name} is all-to-all: its trigger sends each class y to class (y + 1) mod K, so "
                "no single class is reached from every other class. Neural Cleanse looks for one target class that "
                "a small patch reaches from all the others, so this verdict says nothing about this backdoor "
                "(a flagged class is not its target: it has none). Screen inputs (STRIP, SCALE-UP, IBD-PSC) and the "
                "views of the known trigger apply instead.")
    if attack in SAMPLE_SPECIFIC_TRIGGERS:
        what = f"The known attack ({attack}) has a sample-specific trigger: {SAMPLE_SPECIFIC_TRIGGERS[attack]}. "
        if level == "flagged":
            return (what + "Neural Cleanse recovers one small mask and pattern shared by all images, which this "
                    "trigger is not: the flagged class may be the target, but its recovered mask is a stand-in the "
                    "model also reacts to, not the attack's trigger.")
        return (what + "Neural Cleanse assumes one small, input-agnostic patch that flips every image to the target; "
                "that does not hold here, so this verdict is no evidence that the model has no backdoor. Screen "
                "inputs (STRIP, SCALE-UP, IBD-PSC) and the views of the known trigger apply instead.")
    full = footprint_share is not None and footprint_share > FULL_IMAGE_SHARE
    if full and level != "flagged":
        return (f"The known trigger{f' ({trigger_name})' if trigger_name else ''} changes "
                f"{100 * footprint_share:.0f}% of the image. Neural Cleanse looks for the smallest *patch* that flips "
                "images to one class; it cannot find a full-image trigger (a blended image, SIG's signal, WaNet's "
                "warp), so this verdict says nothing about this backdoor. Screen inputs (STRIP, SCALE-UP, IBD-PSC) "
                "and the views of the known trigger apply instead.")
    if level == "clean":
        return ("Neural Cleanse looks for small patch triggers only: a full-image trigger (a blended image, SIG's "
                "sinusoidal signal, WaNet's warp) has no small patch to find, so a model with one also shows "
                "\"nothing stands out\". This verdict rules out a small-patch backdoor at this budget, no more.")
    return ""


@dataclass
class ReverseResult:
    """Per class: mask (H, W), pattern (C, H, W), mask L1 norm (NaN when the class did not converge), success of
    the returned mask on the scan images of the other classes; plus anomaly indices (NaN when not converged) and the
    flagged classes (anomaly index > threshold, small side)."""

    masks: np.ndarray
    patterns: np.ndarray
    l1: np.ndarray
    success: np.ndarray
    anomaly: np.ndarray
    flagged: list[int]
    threshold: float
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    #: per class, the success of the epoch whose mask was kept (>= the threshold exactly when the class converged);
    #: None for a scan stored before it was recorded
    epoch_success: np.ndarray | None = None
    created: str = ""  # when the scan ran (local time, minutes)
    stored: bool = False  # True when this result was read back from the run store, not computed now

    @property
    def converged(self) -> np.ndarray:
        """Per class: whether some epoch reached the success threshold (the norm is then finite)."""
        return np.isfinite(np.asarray(self.l1, dtype=np.float64))

    @property
    def most_suspicious(self) -> int:
        """The converged class with the largest anomaly index (the smallest mask relative to the others); when no
        class converged, the class whose last mask succeeded most often."""
        if self.converged.any():
            return int(np.nanargmax(self.anomaly))
        return int(np.nanargmax(np.nan_to_num(self.success, nan=-1.0)))

    def verdict(self, classes: list[str] | None = None) -> Verdict:
        return verdict(self.l1, self.threshold, classes)

    def to_dict(self) -> dict:
        def clean(a: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=np.float64)]

        epoch = self.epoch_success if self.epoch_success is not None else np.full(len(self.l1), np.nan)
        return {"l1": clean(self.l1), "success": clean(self.success), "epoch_success": clean(epoch),
                "anomaly_index": clean(self.anomaly), "converged": [bool(c) for c in self.converged],
                "flagged": self.flagged, "threshold": self.threshold, "seconds": round(self.seconds, 2),
                "config": self.config, "created": self.created, "stored": self.stored}

    def class_table(self, classes: list[str] | None = None) -> list[dict[str, Any]]:
        """One row per class: converged, the kept epoch's success (the convergence test), the kept mask's success
        re-measured on all scan images, mask L1 and anomaly index (None where there is none), flagged."""
        epoch = self.epoch_success if self.epoch_success is not None else np.full(len(self.l1), np.nan)

        def num(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        return [{"class": k, "name": classes[k] if classes else str(k), "converged": bool(self.converged[k]),
                 "epoch_success": num(epoch[k]), "success": num(self.success[k]), "mask_l1": num(self.l1[k]),
                 "anomaly_index": num(self.anomaly[k]), "flagged": k in self.flagged}
                for k in range(len(self.l1))]

    def stored_text(self) -> str:
        """``stored scan of 2026-12-06 14:02 (it took 76.9 s then)`` for a result read back from the run store,
        ``76.9 s`` for one computed now."""
        if not self.stored:
            return f"{self.seconds:.1f} s"
        return (f"stored scan of {self.created or 'an earlier date'} (it took {self.seconds:.1f} s then; "
                "nothing was recomputed)")


def neural_cleanse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   config: ScanConfig | None = None, progress: Progress | None = None,
                   should_stop: Callable[[], bool] | None = None) -> ReverseResult:
    """Scan every class of ``model`` on clean images ``x`` with true labels ``y``; for class t only the images with
    ``y != t`` are used. ``progress(fraction, message, metrics)`` is called after every epoch of every class, its
    message carrying an ETA (assuming the remaining classes use their whole budget). ``should_stop`` is polled every
    batch; when it returns True the scan raises ``InterruptedError``."""
    config = config or ScanConfig()
    config.check()
    y = torch.as_tensor(y).long().cpu()
    if len(y) != len(x):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    t0 = time.time()
    results: list[ClassResult] = []
    with _frozen(model):
        for t in range(num_classes):
            def on_epoch(epoch: int, metrics: dict, t: int = t) -> None:
                if progress is None:
                    return
                frac = (t + epoch / config.steps) / num_classes
                progress(frac, f"class {t + 1}/{num_classes}, epoch {epoch}/{config.steps}, "
                               f"λ {metrics['lambda']:.1e}", {"class": t, "epoch": epoch, **metrics})

            r = reverse_engineer_class(model, x[y != t], t, config, should_stop=should_stop, on_epoch=on_epoch)
            results.append(r)
            if progress is not None:
                state = f"L1 {r.l1:.1f}" if r.converged else "did not converge"
                progress((t + 1) / num_classes, f"class {t + 1}/{num_classes} done ({state})",
                         {"class": t, "l1": r.l1, "success": r.success, "converged": r.converged,
                          "epochs": r.epochs})
    l1 = np.array([r.l1 for r in results], dtype=np.float64)
    anomaly = anomaly_indices(l1)
    flagged = [int(i) for i in np.nonzero(np.nan_to_num(anomaly, nan=-np.inf) > config.threshold)[0]]
    return ReverseResult(np.stack([r.mask for r in results]), np.stack([r.pattern for r in results]), l1,
                         np.array([r.success for r in results]), anomaly, flagged, config.threshold,
                         seconds=time.time() - t0,
                         config={**asdict(config), "epochs_run": [r.epochs for r in results]},
                         epoch_success=np.array([r.epoch_success for r in results], dtype=np.float64),
                         created=time.strftime("%Y-%m-%d %H:%M"))


def reference_scan(config: ScanConfig | None = None, reference: str = "demo:clean",
                   progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> ReverseResult:
    """The same scan on a model known to be clean (default: the bundled ``demo:clean`` suspect), the reference a
    user compares a scan's anomaly indices against. The caller stores it (e.g. ``runs.scans`` keyed by config)."""
    import suspects

    ref = suspects.load(reference)
    config = config or ScanConfig()
    x, y = scan_data(ref, config)
    return neural_cleanse(ref.model, x, y, ref.num_classes, config, progress=progress, should_stop=should_stop)


def reference_indices(config: ScanConfig | None = None, reference: str = "demo:clean",
                      progress: Progress | None = None) -> np.ndarray:
    """The reference suspect's anomaly indices under ``config`` (NaN for classes that did not converge)."""
    return reference_scan(config, reference, progress).anomaly


def scan_data(suspect, config: ScanConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean defense-pool images a scan uses and their true labels (a seeded subset; never the test split)."""
    pool = suspect.defense_pool
    n = min(int(config.n_images), len(pool))
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(config.seed)))[:n]
    return pool.images(idx), pool.labels[idx]


# --- scanning a suspect (stored once per (model, data, budget) by runs.scans) ----------------------------------


def scan_images(suspect, config: ScanConfig) -> torch.Tensor:
    """The clean defense-pool images a scan uses (:func:`scan_data` without the labels)."""
    return scan_data(suspect, config)[0]


def scan_suspect(suspect, config: ScanConfig | None = None, progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None) -> ReverseResult:
    """Neural Cleanse over every class of ``suspect`` on its defense pool (computed every time; a stored scan,
    reused across runs, is :func:`runs.scans.scan_suspect`)."""
    config = config or ScanConfig()
    config.check()
    x, y = scan_data(suspect, config)
    result = neural_cleanse(suspect.model, x, y, suspect.num_classes, config, progress=progress,
                            should_stop=should_stop)
    result.config = {**result.config, "images": int(len(x)), "source": "defense pool"}
    return result


def trigger_overlap(mask: np.ndarray, footprint: np.ndarray) -> dict[str, Any]:
    """How a recovered mask sits on a known trigger's footprint, and on its horizontal mirror image.

    ``mass_on_trigger``: the share of the mask's mass on the footprint; ``iou``: the IoU of the mask's peak region
    (>= half its maximum) with the footprint; ``mass_on_mirror`` / ``iou_mirror``: the same for the footprint
    flipped left-right (a model trained with horizontal-flip augmentation learns the mirrored patch too, and Neural
    Cleanse may recover that one); ``closer``: "trigger", "mirror", or "same" when the footprint is its own mirror
    image or both overlaps are equal; ``mass_best`` / ``iou_best``: those of the closer footprint.
    """
    mask = np.asarray(mask, dtype=np.float64)
    fp = np.asarray(footprint, dtype=bool)
    mirror = fp[..., ::-1]
    peak = mask >= 0.5 * mask.max()
    total = max(mask.sum(), 1e-12)

    def measure(f: np.ndarray) -> tuple[float, float]:
        return float((mask * f).sum() / total), float((peak & f).sum() / max((peak | f).sum(), 1))

    mass, iou = measure(fp)
    mass_m, iou_m = measure(mirror)
    if np.array_equal(fp, mirror) or (mass, iou) == (mass_m, iou_m):
        closer = "same"
    else:
        closer = "mirror" if (mass_m, iou_m) > (mass, iou) else "trigger"
    best = (mass_m, iou_m) if closer == "mirror" else (mass, iou)
    return {"mass_on_trigger": mass, "footprint_share": float(fp.mean()), "iou": iou,
            "mass_on_mirror": mass_m, "iou_mirror": iou_m, "closer": closer,
            "mass_best": best[0], "iou_best": best[1]}


#: at most this many images give a sample-specific trigger's per-image footprints (:func:`known_trigger_overlap`)
OVERLAP_IMAGES = 64


def known_trigger_overlap(mask: np.ndarray, trigger, x: torch.Tensor | None = None) -> dict[str, Any]:
    """:func:`trigger_overlap` of a recovered mask with a known trigger. A trigger whose pixels differ per image
    (``trigger.sample_specific``, e.g. the input-aware attack) is compared with each of (up to
    :data:`OVERLAP_IMAGES` of) the clean images ``x``'s own footprints (``trigger.footprints``) and the measures are
    averaged over them (``per_image``: how many); any other trigger (or no ``x``) with its one shared footprint, as
    :func:`trigger_overlap`."""
    if x is None or not trigger.sample_specific:
        return trigger_overlap(mask, trigger.footprint().numpy())
    fps = trigger.footprints(x[:OVERLAP_IMAGES]).cpu().numpy().astype(bool)
    per = [trigger_overlap(mask, f) for f in fps]
    out: dict[str, Any] = {k: float(np.mean([p[k] for p in per]))
                           for k in ("mass_on_trigger", "footprint_share", "iou", "mass_on_mirror", "iou_mirror")}
    trig, mirr = (out["mass_on_trigger"], out["iou"]), (out["mass_on_mirror"], out["iou_mirror"])
    out["closer"] = "same" if trig == mirr else ("mirror" if mirr > trig else "trigger")
    out["mass_best"], out["iou_best"] = mirr if out["closer"] == "mirror" else trig
    out["per_image"] = len(fps)
    return out


def known_footprint_share(trigger, x: torch.Tensor | None = None) -> float:
    """The share of the image a known trigger changes: of its shared footprint, or for a sample-specific trigger
    with clean images ``x``, the mean of each image's own footprint share (see :func:`known_trigger_overlap`)."""
    if x is None or not trigger.sample_specific:
        return float(trigger.footprint().float().mean())
    return float(trigger.footprints(x[:OVERLAP_IMAGES]).float().mean())


def recovered_trigger_spec(result: ReverseResult, target: int) -> dict[str, Any]:
    """The spec of a :class:`suspects.triggers.RecoveredTrigger` for class ``target`` of a scan."""
    return {"name": "recovered", "target": int(target), "mapping": "all-to-one",
            "params": {"mask": np.round(result.masks[target], 4).tolist(),
                       "pattern": np.round(result.patterns[target], 4).tolist(),
                       "source": {"method": "neural_cleanse", "anomaly_index": round(float(result.anomaly[target]), 3),
                                  "flagged": target in result.flagged, "mask_l1": round(float(result.l1[target]), 3),
                                  "config": result.config}}}
