"""How long a defense run takes: elapsed time and ETA of a running one, and the expected time of one not yet started.

The expected time is, in this order (issue 12.4 / 17.4 / 27.8):

1. **measured**: the median wall time of finished runs in the store with the same defense, the same resolved
   parameters (so the same preset and overrides), the same suspect, pool size and ``measure`` option, on the same
   kind of device; with the range (fastest to slowest) of those runs;
2. **measured on similar suspects**: the same, from runs on other suspects of the same architecture, width and input
   shape (the demo suspects are one such family), when this suspect has none;
3. **estimated**: a budget in image passes (:func:`budget_passes`, from the defense's parameters) times the time
   of one forward+backward pass per image, timed here on a few pool images for this model and device
   (:func:`pass_timing`: several steps, cached), plus the test-split measurements. A busy CPU slows some steps a
   lot, so the figure uses the fastest step and the range runs up to the median step;
4. otherwise no figure (a defense whose budget this module cannot count, e.g. DBD or CBD, until it has run once).

The labels say which one a figure is, so an estimate is never shown as a measurement.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from defenses.registry import get_defense
from defenses.runner import held_out_count, parse_measure, resolve_pool_size
from suspects.device import pick_device, prepare_model, to_device
from suspects.metrics import model_fingerprint, stored_metrics
from suspects.store import Suspect

from .identity import runs_of
from .store import RunStore
from .uploads import read_card

__all__ = ["Expected", "fmt_duration", "eta_text", "measured_seconds", "pass_seconds", "pass_timing",
           "budget_passes", "estimate_seconds", "expected_time"]

FORWARD_SHARE = 1.0 / 3.0  # a forward pass alone costs about a third of forward + backward
TIMED_STEPS = 5  # training steps timed for an estimate (after one warm-up step) ...
TIMING_BUDGET_S = 3.0  # ... or fewer (at least 2) once this many seconds are spent
_PASS_CACHE: dict[tuple[str, str, int], tuple[float, float]] = {}


def fmt_duration(seconds: float) -> str:
    """``42`` -> ``0:42``, ``4210`` -> ``1:10:10``."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_text(fraction: float, elapsed: float) -> str:
    """``elapsed 0:42, about 1:10 left`` from the done ``fraction`` and the ``elapsed`` seconds (linear in the
    fraction; no remaining time before 1% is done)."""
    text = f"elapsed {fmt_duration(elapsed)}"
    fraction = min(max(float(fraction), 0.0), 1.0)
    if 0.01 <= fraction < 1.0 and elapsed > 0:
        text += f", about {fmt_duration(elapsed * (1.0 - fraction) / fraction)} left"
    return text


@dataclass
class Expected:
    """An expected wall time: ``source`` is ``measured`` (from ``n_runs`` finished runs; ``detail`` says when they
    ran on other suspects), ``estimated`` or ``unknown`` (``seconds`` None); ``low`` / ``high``: its range."""

    seconds: float | None
    source: str
    n_runs: int = 0
    detail: str = ""
    low: float | None = None
    high: float | None = None

    def range_text(self) -> str:
        """``0:40-0:55`` when the range is wider than a few seconds, else empty."""
        if self.low is None or self.high is None or round(self.high) - round(self.low) < 5:
            return ""
        return f"{fmt_duration(self.low)}-{fmt_duration(self.high)}"

    def text(self) -> str:
        if self.seconds is None:
            return "expected time: unknown until one run has finished" + (f" ({self.detail})" if self.detail else "")
        runs = f"{self.n_runs} run{'s' if self.n_runs != 1 else ''}"
        label = ((f"measured from {runs}" + (f" {self.detail}" if self.detail else "")) if self.source == "measured"
                 else "estimated" + (f": {self.detail}" if self.detail else ""))
        span = self.range_text()
        return f"expected time: about {fmt_duration(self.seconds)} ({span + ', ' if span else ''}{label})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device_kind(device: str | None) -> str:
    return (device or "").split(" ")[0].split(":")[0] or "cpu"


def _matching_times(store: RunStore, defense: str, resolved: dict[str, Any], suspect_ref: str | None,
                    pool_size: int, device_kind: str, measure: str = "full", family: dict | None = None
                    ) -> list[float]:
    """Seconds of the finished runs of ``defense`` with these resolved parameters, pool size, ``measure`` option and
    device kind: of suspect ``suspect_ref``, or (``suspect_ref`` None) of any other suspect whose model has the
    ``family`` (architecture, its arguments, input shape) of the repaired model its run folder holds."""
    times = []
    for rec in (runs_of(store, suspect_ref, defense=defense) if suspect_ref is not None  # the model, any name
                else store.list(status="finished", defense=defense)):
        summary = rec.summary or {}
        if (rec.params.get("_resolved") != resolved or int(rec.pool_size) != int(pool_size)
                or str(rec.params.get("_measure") or "full") != measure
                or _device_kind(summary.get("device")) != device_kind or summary.get("seconds") is None):
            continue
        if family is not None and _family(read_card(rec.run_dir) or {} if rec.run_dir else {}) != family:
            continue
        times.append(float(summary["seconds"]))
    return times


def _family(card: dict[str, Any]) -> dict[str, Any]:
    """What makes two suspects' runs take the same time: architecture, its arguments, input shape, data source."""
    return {"arch": card.get("arch"), "arch_kwargs": card.get("arch_kwargs") or {},
            "input_shape": list(card.get("input_shape") or []), "data": card.get("data")}


def measured_seconds(store: RunStore, defense: str, resolved: dict[str, Any], suspect_ref: str, pool_size: int,
                     device_kind: str, measure: str = "full") -> tuple[float | None, int]:
    """Median seconds of matching finished runs (see the module docstring) and how many there were."""
    times = _matching_times(store, defense, resolved, suspect_ref, pool_size, device_kind, measure)
    return (statistics.median(times) if times else None), len(times)


def pass_timing(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                batch_size: int = 32, repeats: int = TIMED_STEPS, budget_s: float = TIMING_BUDGET_S
                ) -> tuple[float, float]:
    """Seconds of one forward+backward pass per image for ``model`` on ``device``: (fastest, median) over up to
    ``repeats`` timed steps (at least 2; fewer once ``budget_s`` is spent), on a copy, after one warm-up step; cached
    per weights, device and CPU thread count. Other work on a shared CPU slows single steps, so one step is no
    measure: the fastest is what the machine can do, the median what it did just now."""
    import copy

    key = (model_fingerprint(model), str(device), torch.get_num_threads())
    if key in _PASS_CACHE:
        return _PASS_CACHE[key]
    net = prepare_model(copy.deepcopy(model), device).train()
    x = to_device(images[:batch_size], device)
    y = labels[:batch_size].to(device)
    n = max(1, len(y))
    spent: list[float] = []
    start = time.perf_counter()
    for i in range(max(2, repeats) + 1):
        t0 = time.perf_counter()
        F.cross_entropy(net(x), y).backward()
        net.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            spent.append(time.perf_counter() - t0)
            if len(spent) >= 2 and time.perf_counter() - start > budget_s:
                break
    _PASS_CACHE[key] = (min(spent) / n, statistics.median(spent) / n)
    return _PASS_CACHE[key]


def pass_seconds(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 batch_size: int = 32, repeats: int = TIMED_STEPS) -> float:
    """The fastest of :func:`pass_timing`'s steps: seconds of one forward+backward pass per image."""
    return pass_timing(model, images, labels, device, batch_size, repeats)[0]


def budget_passes(defense: str, params: Any, n_train: int, n_val: int, n_channels: int = 512,
                  n_trainset: int = 0) -> float | None:
    """The defense's budget in image passes (forward+backward of one image = 1; forward only = 1/3), counted from
    its parameters (pruning: at most ``max_ratio`` of the last layer's ``n_channels``, one held-out measurement per
    channel; the training-time defenses from ``n_trainset``, the poisoned training set's size); None for a defense
    this rule does not know."""
    p = asdict(params) if not isinstance(params, dict) else params
    if defense in ("dbd", "cbd"):
        n = min(p["subset"], n_trainset) if p.get("subset") else n_trainset
        if n <= 0:
            return None
        if defense == "dbd":  # SimCLR on two views, the linear head on frozen features, MixMatch (64 + 2 x 64 guessed)
            simclr = 0 if p.get("reuse_backbone_from") else p["simclr_epochs"] * n * 2
            warmup = p["warmup_epochs"] * n * FORWARD_SHARE
            semi = p["semi_epochs"] * (p["iterations"] * p["batch_size"] * (3 + 2 * FORWARD_SHARE) + n * FORWARD_SHARE)
            return simclr + warmup + semi
        disc = 2 * FORWARD_SHARE if p.get("disc_pass") == "full" else 0.0  # f_B, then f_C with f_B's features
        f_b = p["steps_b"] * min(p["batch_size"], n) if p.get("steps_b") else p["epochs_b"] * n
        return f_b + p["epochs"] * n * (1 + FORWARD_SHARE + disc)
    if defense in ("finetune", "fst", "shortcut", "fineprune"):  # fine-tuning counted in optimisation steps
        passes_over_pool = -(-p["steps"] // max(1, -(-n_train // p["batch_size"])))
        tuning = p["steps"] * min(p["batch_size"], max(1, n_train)) + FORWARD_SHARE * 2 * n_val * passes_over_pool
        if defense != "fineprune":
            return tuning
        prunes = max(1, int(p["max_ratio"] / max(p["once_prune_ratio"], 1e-6)))
        return tuning + FORWARD_SHARE * (n_train + prunes * n_val)
    if defense in ("ftsam", "nad"):  # counted in steps: FT-SAM two passes a step, NAD's student also runs the teacher
        def stage(steps: int, per_image: float) -> float:
            passes_over_pool = -(-steps // max(1, -(-n_train // p["batch_size"])))
            return (steps * min(p["batch_size"], max(1, n_train)) * per_image
                    + FORWARD_SHARE * 2 * n_val * passes_over_pool)
        if defense == "ftsam":
            return stage(p["steps"], 2.0)
        return stage(p["teacher_steps"], 1.0) + stage(p["steps"], 1.0 + FORWARD_SHARE)
    if defense == "clp":  # data-free: one forward pass of two zero images to pair BatchNorms with convolutions
        return FORWARD_SHARE * 2
    if defense == "linf_prune":
        return FORWARD_SHARE * (2 * n_train + 2 * n_val * max(1, int(p["max_ratio"] * n_channels)))
    if defense == "awm":
        steps = p.get("steps") or max(1, n_train // p["batch_size"]) * p["inner"]
        per_step = (p["augmentations"] + 1) if p.get("one_shot") else 1
        return 2 * p["outer"] * steps * p["batch_size"] * per_step
    if defense == "anp":
        return p["iterations"] * p["batch_size"] * (p["steps"] + 1)
    if defense == "sau":  # per image and round: shared PGD on two models, the unlearning step, the frozen copy's labels
        return p["n_rounds"] * n_train * (2 * p["adv_steps"] + 3) + FORWARD_SHARE * 2 * n_val * p["n_rounds"]
    if defense == "rnp":  # unlearning (at most unlearn_epochs; it usually stops earlier), recovery, the sweep
        n = min(p["max_images"], n_train) if p.get("max_images") else n_train
        evals = FORWARD_SHARE * 2 * n_val * (p["unlearn_epochs"] + p["recover_epochs"])
        sweep = FORWARD_SHARE * 2 * n_val * (int(round(p["max_threshold"] / 0.05)) + 2)
        return n * (p["unlearn_epochs"] + p["recover_epochs"]) + evals + sweep
    if defense == "npd":  # per bi-level image: clean labels, the attack (step + check), clean and perturbed passes
        bs = min(p["batch_size"], max(1, n_train))
        passes = -(-(p["warmup_steps"] + p["steps"]) // max(1, -(-n_train // bs)))
        per_image = FORWARD_SHARE + p["inner_steps"] * (1 + FORWARD_SHARE) + 2
        return p["warmup_steps"] * bs + p["steps"] * bs * per_image + FORWARD_SHARE * 2 * n_val * passes
    if defense == "ibau":  # per round: the inner pass for delta, then K Hessian-vector products per outer step
        per_round = n_train * (2 + 2 * p["K"] + 1 + FORWARD_SHARE) + FORWARD_SHARE * 2 * n_val
        return p["n_rounds"] * per_round
    if defense == "abl":  # isolation on the whole set, the scoring pass, fine-tuning on D_c, unlearning D_b
        n = min(p["subset"], n_trainset) if p.get("subset") else n_trainset
        if n <= 0:
            return None
        n_b = max(1, int(n * p["isolation_ratio"]))
        evals = FORWARD_SHARE * 2 * n_val * (p["isolation_epochs"] + p["finetune_epochs"] + p["unlearning_epochs"])
        return (p["isolation_epochs"] * n + FORWARD_SHARE * n + p["finetune_epochs"] * (n - n_b)
                + p["unlearning_epochs"] * n_b + evals)
    if defense == "btidbf":  # per image: G pre-training, then per round the mask (a forward), the inversion (G and
        # two model passes), the unlearning (two model passes); the generator's own cost is left out
        per_round = n_train * (p["mround"] * (FORWARD_SHARE + 0.2) + 2 * p["uround"] + 2 * p["ul_round"])
        evals = FORWARD_SHARE * 3 * n_val + FORWARD_SHARE * n_train
        return 2 * p["preround"] * n_train + p["nround"] * (per_round + evals)
    return None


def estimate_seconds(defense: str, params: Any, suspect: Suspect, pool_size: int, device: torch.device,
                     measure: str = "full") -> tuple[float | None, str]:
    """Budget x timed pass (the fastest step) + the test-split measurements ("before" only when the card cannot be
    reused); :func:`estimate_range` adds the range."""
    low, _, detail = estimate_range(defense, params, suspect, pool_size, device, measure)
    return low, detail


def estimate_range(defense: str, params: Any, suspect: Suspect, pool_size: int, device: torch.device,
                   measure: str = "full") -> tuple[float | None, float | None, str]:
    """(seconds at the fastest timed step, seconds at the median timed step, how it was counted)."""
    n_val = held_out_count(pool_size)
    from defenses.common import head

    split = suspect.card.get("split") or {}
    n_trainset = int(split.get("n_train", 0)) - (n_val if suspect.pool_in_training else int(split.get("n_pool", 0)))
    passes = budget_passes(defense, params, pool_size - n_val, n_val, head(suspect.model).in_features,
                           n_trainset=max(0, n_trainset))
    if passes is None:
        return None, None, f"{defense}'s budget is not counted here"
    pool = suspect.defense_pool
    idx = torch.arange(min(32, len(pool)))
    per, per_median = pass_timing(suspect.model, pool.images(idx), pool.labels[idx], device)
    n_test = len(suspect.test)
    subset = parse_measure(measure, n_test)
    after_n = n_test if subset is None else min(subset, n_test)
    triggered = 2.0 if suspect.trigger is not None else 1.0  # clean + triggered copies
    reuse = stored_metrics(suspect.card, suspect.model, suspect.test, suspect.trigger) is not None
    evals = FORWARD_SHARE * triggered * (after_n + (0 if reuse else n_test))
    where = f"on {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else f"on {device.type}"
    return per * (passes + evals), per_median * (passes + evals), (
        f"{passes:,.0f} training image passes at {1000 * per:.2f}-{1000 * per_median:.2f} ms each, the fastest and "
        f"the median of the training steps timed here {where}")


def expected_time(store: RunStore, defense: str, preset: str, overrides: dict[str, Any] | None, suspect: Suspect,
                  suspect_ref: str, pool_size: int | None = None, device: str | torch.device | None = None,
                  measure: str = "full", estimate: bool = True) -> Expected:
    """The expected wall time of this run (see the module docstring); ``estimate=False`` skips the timed step."""
    pool_size = resolve_pool_size(pool_size, len(suspect.defense_pool))
    d = get_defense(defense)
    params = d.make_params(preset, overrides)
    dev = pick_device(str(device) if device is not None else None)
    resolved, measure = asdict(params), str(measure or "full")
    times = _matching_times(store, defense, resolved, suspect_ref, pool_size, dev.type, measure)
    if times:
        return Expected(statistics.median(times), "measured", len(times), low=min(times), high=max(times))
    family = _family(suspect.card)
    similar = _matching_times(store, defense, resolved, None, pool_size, dev.type, measure, family)
    if similar:
        return Expected(statistics.median(similar), "measured", len(similar),
                        f"of {defense} ({preset}) on other suspects of this architecture and data",
                        low=min(similar), high=max(similar))
    if not estimate:
        return Expected(None, "unknown")
    low, high, detail = estimate_range(defense, params, suspect, pool_size, dev, measure)
    if low is None or not math.isfinite(low):
        return Expected(None, "unknown", 0, detail)
    return Expected(low, "estimated", 0, detail, low=low, high=high)
