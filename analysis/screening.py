"""Input screening: per-image scores saying how likely an input carries a backdoor trigger.

Three test-time detectors behind one interface (:class:`Screener`) and a registry:

- STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019),
- SCALE-UP (Guo et al., "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing Scaled
  Prediction Consistency", ICLR 2023),
- IBD-PSC (Hou et al., "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling Consistency",
  ICML 2024).

Every score is oriented so that *higher means more likely triggered*. The decision threshold is chosen on clean
defense-pool images only (:func:`calibrate`: a target false-positive rate, default 5 %); the test split is used
only to measure the result (AUROC, ROC curve, TPR at the threshold, the FPR actually observed) when the suspect's
trigger is known or adopted. :func:`screen_images` gives a verdict for a user's own PNG/JPEG images.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import autocast, pick_device
from suspects.params import ParamError, param, param_specs, params_from
from suspects.store import Suspect

__all__ = [
    "Screener",
    "Strip",
    "ScaleUp",
    "IbdPsc",
    "ScreenResult",
    "Calibration",
    "ImageVerdict",
    "register_screener",
    "get_screener",
    "list_screeners",
    "screener_param_specs",
    "ParamError",
    "calibrate",
    "calibrate_on_pool",
    "screen_suspect",
    "screen_images",
    "load_image",
    "list_image_files",
    "DEFAULT_METHOD",
    "FORMATS",
]

Progress = Callable[[float, str, dict], None]
FORMATS = ("PNG", "JPEG")
MAX_IMAGE_PIXELS = 4096 * 4096
MIN_IMAGE_SIDE = 8
DEFAULT_METHOD = "strip"
_CHUNK = 512  # images per forward pass


screener_param_specs = param_specs  # name kept for callers of the screening API


# --- the interface ----------------------------------------------------------------------------------------


class Screener:
    """Base class of input-screening methods.

    A screener is built with its parameters (:func:`get_screener`), fitted once on clean defense-pool images
    (:meth:`fit`: e.g. STRIP's overlay images, IBD-PSC's layer choice) and then scores any batch
    (:meth:`scores`, higher = more likely triggered). ``reserved_pool`` lists the pool images :meth:`fit` used in
    a way that would bias their own scores (STRIP's overlays); calibration leaves them out.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # teaching text: what the method assumes and what it costs
    score_label: ClassVar[str] = "score"
    Params: ClassVar[type] = object
    presets: ClassVar[dict[str, dict[str, Any]]] = {"quick": {}, "paper": {}}

    def __init__(self, params: Any | None = None):
        self.params = params if params is not None else self.Params()
        self.reserved_pool = torch.empty(0, dtype=torch.long)
        self.fitted = False

    @classmethod
    def make_params(cls, preset: str = "quick", overrides: dict[str, Any] | None = None) -> Any:
        """Parameters of ``preset`` with ``overrides`` applied; unknown names and bad values raise ParamError
        (a ValueError)."""
        if preset not in cls.presets:
            raise ParamError(f"{cls.name}: unknown preset {preset!r}; presets: {sorted(cls.presets)}")
        return params_from(cls.Params, {**cls.presets[preset], **(overrides or {})})

    def forward_passes(self) -> int:
        """Forward passes per screened image (the cost in units of one prediction)."""
        raise NotImplementedError

    def fit(self, model: nn.Module, pool_x: torch.Tensor, device: torch.device,
            pool_y: torch.Tensor | None = None) -> None:
        """Prepare with clean pool images ``pool_x`` (float, [0, 1]) and their labels; the default needs nothing."""
        self.fitted = True

    def _scores(self, model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def scores(self, model: nn.Module, x: torch.Tensor, device: torch.device | str | None = None,
               batch_size: int | None = None, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Scores (float64, higher = more likely triggered) of float images ``x`` (N, C, H, W) in [0, 1].

        Images go through in batches sized so that one forward pass holds about 512 images; ``progress`` is
        called with the number of images done after each batch.
        """
        if not self.fitted:
            raise RuntimeError(f"{self.title}: call fit() with clean pool images before scoring")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if batch_size is None:
            batch_size = max(1, _CHUNK // max(1, self.forward_passes()))
        was_training = model.training
        model.eval()
        out: list[torch.Tensor] = []
        try:
            for start in range(0, len(x), batch_size):
                out.append(self._scores(model, x[start:start + batch_size].to(device), device).double().cpu())
                if progress is not None:
                    progress(min(len(x), start + batch_size))
        finally:
            model.train(was_training)
        return torch.cat(out).numpy() if out else np.empty(0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "paper": self.paper, "params": dataclasses.asdict(self.params)}


_REGISTRY: dict[str, type[Screener]] = {}


def register_screener(cls: type[Screener]) -> type[Screener]:
    """Class decorator: check ``cls`` (a :class:`Screener` with ``forward_passes`` and ``_scores``, a ``Params``
    dataclass, presets that build) and add it to the registry under ``cls.name``; a taken name is refused."""
    from suspects.plugins import PluginError, check_params_and_presets, claim_name

    if not (isinstance(cls, type) and issubclass(cls, Screener)):
        raise PluginError(f"{cls!r} is not a subclass of analysis.screening.Screener")
    where = f"screener {cls.__qualname__}"
    for method in ("forward_passes", "_scores"):
        if getattr(cls, method) is getattr(Screener, method):
            raise PluginError(f"{where} does not implement {method}()")
    check_params_and_presets(where, cls, ("quick",))
    if isinstance(cls.name, str) and cls.name != cls.name.lower().replace("_", "-"):
        raise PluginError(f"{where}: a screener's name is lower case with '-' between words, got {cls.name!r}")
    _REGISTRY[claim_name("screeners", _REGISTRY, cls.name, cls)] = cls
    return cls


def list_screeners() -> list[str]:
    """Registered screening methods: the built-ins in the order they were registered, then installed plugins."""
    from suspects.plugins import load_plugins

    load_plugins("screeners", _REGISTRY, register_screener, builtin_modules=(__name__,))
    return list(_REGISTRY)


def get_screener(name: str, preset: str = "quick", params: dict[str, Any] | None = None) -> Screener:
    """A new, unfitted screener ``name`` with the parameters of ``preset`` and the overrides ``params``."""
    key = name.lower().replace("_", "-")
    if key not in list_screeners():
        raise ValueError(f"unknown screening method {name!r}; registered: {', '.join(list_screeners())}")
    cls = _REGISTRY[key]
    return cls(cls.make_params(preset, params))


def _logits(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Float32 logits of ``x``, in forward passes of at most ``_CHUNK`` images."""
    outs = []
    for start in range(0, len(x), _CHUNK):
        with autocast(device):
            outs.append(model(x[start:start + _CHUNK]).float())
    return torch.cat(outs)


def _log_one_minus_p(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """log(1 - softmax(logits)[label]) in float64, computed from the other classes' logits so that it stays
    finite and ordered where the probability itself rounds to 1."""
    z = logits.double()
    others = z.scatter(1, label[:, None], float("-inf"))
    return torch.logsumexp(others, 1) - torch.logsumexp(z, 1)


def _resolved_consistency(log_miss: torch.Tensor) -> torch.Tensor:
    """-log(1 - mean_i p_i) from ``log_miss[i] = log(1 - p_i)``: a strictly increasing function of the mean
    probability ``mean_i p_i`` that does not saturate at 1 (confident inputs keep distinct scores)."""
    return -(torch.logsumexp(log_miss, 0) - math.log(len(log_miss)))


# --- STRIP ---------------------------------------------------------------------------------------------------


@dataclass
class StripParams:
    n: int = param(100, help="N: clean images superimposed on each input (the paper's 100; cost is N forward "
                              "passes per input)", min=2, max=1000, integer=True)
    weight: float = param(1.0, help="weight w of the overlay in clip(x + w * overlay, 0, 1); 1 = the paper's "
                                     "additive superimposition", min=0.05, max=1.0)
    seed: int = param(0, help="seed of the choice of overlay images from the defense pool", min=0, integer=True)


@register_screener
class Strip(Screener):
    """STRIP (Gao et al., ACSAC 2019): superimpose the input with N clean images and measure the entropy of the
    predictions. A trigger that dominates the decision keeps every superimposed copy in the target class (low
    entropy); a clean input's copies scatter over classes (high entropy). Score = minus the mean entropy (nats).

    Deviation: the paper draws N random clean images per input; here one fixed set of N defense-pool images
    (seeded) is used for every input, so a score is a deterministic function of the image. Those N images are
    left out of the threshold calibration (``reserved_pool``).
    """

    name = "strip"
    title = "STRIP"
    paper = "Gao et al., STRIP: A Defence Against Trojan Attacks on Deep Neural Networks, ACSAC 2019"
    summary = ("Superimposes each input with N clean images and looks at how much the predictions vary. Assumes "
               "the trigger survives the superimposition and dominates the decision, so a triggered input keeps "
               "its (target) prediction whatever is overlaid: low prediction entropy. Blending-style or sample-"
               "specific triggers that are washed out by the overlay escape it. Needs N clean images and costs "
               "N forward passes per input (N = 100 in the paper, 8 in the quick preset).")
    score_label = "minus mean prediction entropy (nats)"
    Params = StripParams
    presets = {"quick": {"n": 8}, "paper": {}}

    def forward_passes(self) -> int:
        return int(self.params.n)

    def fit(self, model: nn.Module, pool_x: torch.Tensor, device: torch.device,
            pool_y: torch.Tensor | None = None) -> None:
        n = int(self.params.n)
        if len(pool_x) < n + 1:
            raise ValueError(f"STRIP needs more than N={n} clean pool images (N overlays plus images to calibrate "
                             f"on); the pool has {len(pool_x)}")
        gen = torch.Generator().manual_seed(int(self.params.seed))
        self.reserved_pool = torch.randperm(len(pool_x), generator=gen)[:n].sort().values
        self.overlays = pool_x[self.reserved_pool].clone()
        self.fitted = True

    def _scores(self, model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        over = self.overlays.to(device=device, dtype=x.dtype)
        b, n = len(x), len(over)
        mixed = (x[:, None] + float(self.params.weight) * over[None]).clamp_(0.0, 1.0).flatten(0, 1)
        logp = F.log_softmax(_logits(model, mixed, device), dim=1)
        entropy = -(logp.exp() * logp).sum(1).view(b, n).mean(1)
        return -entropy


# --- SCALE-UP ------------------------------------------------------------------------------------------------


@dataclass
class ScaleUpParams:
    n_factors: int = param(5, help="number of amplification factors: pixel values times 3, 5, ..., 2n+1 (the "
                                    "paper's 3, 5, 7, 9, 11 for n = 5), clipped to [0, 1]", min=1, max=20, integer=True)
    standardize: bool = param(False, help="the paper's data-limited variant: standardize the SPC per predicted "
                                           "class with its mean and standard deviation on clean pool images")


@register_screener
class ScaleUp(Screener):
    """SCALE-UP (Guo et al., ICLR 2023): amplify every pixel value by the factors 3, 5, 7, 9, 11 (clipped to the
    valid range) and count how many amplified copies keep the original prediction: the scaled prediction
    consistency SPC. Triggered inputs stay in the target class under amplification; clean ones drift.

    ``standardize`` is the paper's data-limited variant (per predicted class, (SPC - mean) / std over clean pool
    images). Deviation: the SPC takes only n + 1 values, and a threshold that falls on a tie flags all or none of
    the tied images, so the score adds a tie-breaker smaller than half an SPC step: how confidently the amplified
    copies keep the original class (from ``-log(1 - mean p)``, see :func:`_resolved_consistency`). It never
    reorders images with different SPC values.
    """

    name = "scale-up"
    title = "SCALE-UP"
    paper = ("Guo et al., SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing Scaled "
             "Prediction Consistency, ICLR 2023")
    summary = ("Multiplies every pixel value by 3, 5, 7, 9 and 11 (clipped) and counts how many amplified copies "
               "keep the input's prediction. Assumes the trigger's pixels win over amplified image content, so a "
               "triggered input keeps its target class while a clean input's prediction drifts. Black-box (needs "
               "only predicted labels) and needs no clean data (the data-limited variant uses some to standardize "
               "per class); costs 6 forward passes per input. Triggers that amplification destroys (dark or "
               "low-contrast patterns, warps) can escape it.")
    score_label = "scaled prediction consistency (SPC) + a tie-breaker below half a step"
    Params = ScaleUpParams
    presets = {"quick": {}, "paper": {}}

    @property
    def factors(self) -> list[int]:
        return [2 * i + 3 for i in range(int(self.params.n_factors))]

    def forward_passes(self) -> int:
        return 1 + int(self.params.n_factors)

    def fit(self, model: nn.Module, pool_x: torch.Tensor, device: torch.device,
            pool_y: torch.Tensor | None = None) -> None:
        self.class_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fitted = True
        if not self.params.standardize:
            return
        spc, pred = self._spc(model, pool_x.to(device), device, batched=True)
        k = int(pred.max()) + 1 if len(pred) else 0
        k = max(k, self._num_classes(model))
        mean, std = torch.zeros(k, dtype=torch.float64), torch.ones(k, dtype=torch.float64)
        for c in range(k):
            vals = spc[pred == c].double()
            if len(vals) >= 2:
                mean[c], std[c] = vals.mean(), vals.std().clamp_min(0.05)
            elif len(vals) == 1:
                mean[c] = vals[0]
        self.class_stats = (mean, std)

    @staticmethod
    def _num_classes(model: nn.Module) -> int:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        return int(last[-1].out_features) if last else 0

    @torch.inference_mode()
    def _spc(self, model: nn.Module, x: torch.Tensor, device: torch.device,
             batched: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if batched:
            step = max(1, _CHUNK // self.forward_passes())
            parts = [self._spc(model, x[i:i + step], device) for i in range(0, len(x), step)]
            if not parts:
                return torch.empty(0), torch.empty(0, dtype=torch.long)
            return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()
        factors = self.factors
        stack = torch.cat([x] + [(x * f).clamp_(0.0, 1.0) for f in factors])
        logits = _logits(model, stack, device).view(1 + len(factors), len(x), -1)
        pred, scaled = logits[0].argmax(1), logits[1:]
        spc = (scaled.argmax(2) == pred[None]).double().mean(0)
        # tie-breaker below half an SPC step: how confidently the amplified copies keep the prediction
        u = _resolved_consistency(torch.stack([_log_one_minus_p(z, pred) for z in scaled]))
        return spc + (u / (1.0 + u)) * 0.5 / len(factors), pred

    def _scores(self, model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        spc, pred = self._spc(model, x, device)
        if self.class_stats is None:
            return spc
        mean, std = (s.to(spc.device) for s in self.class_stats)
        return (spc.double() - mean[pred]) / std[pred]


# --- IBD-PSC -------------------------------------------------------------------------------------------------


@dataclass
class IbdPscParams:
    n: int = param(5, help="n: parameter-amplified models (the paper's 5); cost is n + 1 forward passes per input",
                    min=1, max=20, integer=True)
    omega: float = param(1.5, help="omega: factor multiplying the weight and bias of the amplified BatchNorm "
                                    "layers (the paper's 1.5)", min=1.01, max=10.0)
    xi: float = param(0.6, help="xi: clean-pool error rate the layer selection must exceed (the paper's 0.6)",
                       min=0.05, max=0.99)
    n_select: int = param(256, help="clean pool images used to select the layers (0 = all)", min=0, integer=True)


@register_screener
class IbdPsc(Screener):
    """IBD-PSC (Hou et al., ICML 2024): amplify the weight and bias of the later BatchNorm layers by omega and
    measure how confident the amplified models stay in the input's original prediction (parameter-oriented
    scaling consistency, PSC = mean softmax probability of the original class over n amplified models).
    Backdoor neurons make triggered inputs keep their prediction under amplification; clean inputs lose it.

    Layer selection (the paper's adaptive rule, read from its description and official code): BatchNorm layers are
    taken in reverse order of registration (the last first); k* is the smallest k for which amplifying the last
    k layers makes the clean-pool error rate exceed xi; the n models amplify the last k*, k* + 1, ..., k* + n - 1
    layers (capped at the number of layers; when no k reaches xi, the last n layers' prefixes are used).
    The official code starts one layer further (k* + 1); on the demo suspects neither start is consistently
    better. Scaling a BatchNorm's weight and bias by omega equals scaling its output by omega, which is how it is
    done here (a forward hook), so the model is never copied.

    The score is ``-log(1 - PSC)``, a strictly increasing function of the PSC (same ranking, same ROC curve)
    computed from the logits so that it does not round to a tie at PSC = 1: a confidently triggered input and a
    confidently classified clean one would otherwise both score exactly 1.0 in float32, and a threshold on the
    clean pool could not separate them.
    """

    name = "ibd-psc"
    title = "IBD-PSC"
    paper = ("Hou et al., IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling Consistency, "
             "ICML 2024")
    summary = ("Amplifies the weight and bias of the model's later BatchNorm layers and checks whether the input's "
               "prediction keeps its confidence. Assumes the backdoor is carried by a few strongly activated "
               "neurons whose effect only grows under amplification, while clean predictions degrade. Needs "
               "BatchNorm layers, white-box access and a few hundred clean images to choose the layers "
               "(adaptively, from the error rate); costs n + 1 = 6 forward passes per input.")
    score_label = "-log(1 - PSC), PSC = parameter-oriented scaling consistency"
    Params = IbdPscParams
    presets = {"quick": {}, "paper": {}}

    def forward_passes(self) -> int:
        return 1 + int(self.params.n)

    @staticmethod
    def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
        """BatchNorm layers in registration order."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @contextmanager
    def amplified(self, model: nn.Module, k: int) -> Iterator[None]:
        """Within the block, the last ``k`` BatchNorm layers' outputs (= weight and bias) are scaled by omega."""
        omega = float(self.params.omega)
        layers = self.bn_layers(model)[::-1][:k]
        handles = [m.register_forward_hook(lambda _m, _i, out: out * omega) for _, m in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def fit(self, model: nn.Module, pool_x: torch.Tensor, device: torch.device,
            pool_y: torch.Tensor | None = None) -> None:
        layers = self.bn_layers(model)
        if not layers:
            raise ValueError("IBD-PSC amplifies BatchNorm layers and this model has none")
        n_layers, n = len(layers), int(self.params.n)
        m = len(pool_x) if not self.params.n_select else min(len(pool_x), int(self.params.n_select))
        if m == 0:
            raise ValueError("IBD-PSC needs clean pool images to choose the layers to amplify")
        sel = pool_x[:m].to(device)
        was_training = model.training
        model.eval()
        start, self.errors = None, []
        try:
            with torch.inference_mode():
                # the error rate against the pool's labels (or, without them, the unamplified predictions)
                base = pool_y[:m].to(device) if pool_y is not None else _logits(model, sel, device).argmax(1)
                for k in range(1, n_layers + 1):
                    with self.amplified(model, k):
                        err = float((_logits(model, sel, device).argmax(1) != base).float().mean())
                    self.errors.append(err)
                    if err > float(self.params.xi):
                        start = k
                        break
        finally:
            model.train(was_training)
        self.fell_back = start is None
        if start is None:
            start = max(1, n_layers - n + 1)
        self.ks = [k for k in range(start, start + n) if k <= n_layers] or [n_layers]
        self.layer_names = [name for name, _ in layers[::-1][: max(self.ks)]]
        self.fitted = True

    def _scores(self, model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        pred = _logits(model, x, device).argmax(1)
        log_miss = []  # log(1 - p_y) per amplified model, exact even where p_y rounds to 1
        for k in self.ks:
            with self.amplified(model, k):
                log_miss.append(_log_one_minus_p(_logits(model, x, device), pred))
        return _resolved_consistency(torch.stack(log_miss))


# --- thresholds and the screening pipeline --------------------------------------------------------------------


def calibrate(scores_clean_pool: np.ndarray | Sequence[float], fpr: float = 0.05) -> float:
    """Threshold with at most ``fpr`` of the clean pool scores strictly above it (inputs scoring above it are
    flagged). Only clean defense-pool scores may come in here: the test split never chooses anything."""
    s = np.sort(np.asarray(scores_clean_pool, dtype=np.float64).ravel())
    if not 0.0 <= float(fpr) < 1.0:
        raise ValueError(f"the target false-positive rate must lie in [0, 1), got {fpr}")
    if len(s) == 0:
        raise ValueError("calibrating a threshold needs at least one clean pool score")
    if not np.isfinite(s).all():
        raise ValueError("clean pool scores must be finite")
    allowed = int(math.floor(float(fpr) * len(s) + 1e-9))  # pool images that may score above the threshold
    return float(s[len(s) - allowed - 1])


@dataclass
class Calibration:
    """A screener fitted on the clean defense pool, and its threshold for a target false-positive rate."""

    method: str
    screener: Screener
    threshold: float
    fpr_target: float
    pool_scores: np.ndarray
    pool_index: torch.Tensor  # defense-pool indices that were scored (the screener's reserved images left out)
    seconds: float

    @property
    def fpr_pool(self) -> float:
        return float((self.pool_scores > self.threshold).mean()) if len(self.pool_scores) else float("nan")


def _model_on(suspect: Suspect, device: torch.device | str | None) -> tuple[nn.Module, torch.device]:
    model = suspect.model
    if device is None:
        params = next(model.parameters(), None)
        return model, params.device if params is not None else pick_device()
    device = torch.device(device)
    return model.to(device), device


def calibrate_on_pool(suspect: Suspect, method: str = DEFAULT_METHOD, *, preset: str = "quick",
                      params: dict[str, Any] | None = None, fpr: float = 0.05, n_pool: int | None = None,
                      device: torch.device | str | None = None, progress: Progress | None = None,
                      screener: Screener | None = None) -> Calibration:
    """Fit ``method`` on the suspect's clean defense pool and choose the threshold there (target ``fpr``).

    ``n_pool`` limits the pool to its first ``n_pool`` images. The screener's reserved images (STRIP's overlays)
    are not scored, so at least 10 others must remain.
    """
    t0 = time.perf_counter()
    if not 0.0 <= float(fpr) < 1.0:
        raise ValueError(f"the target false-positive rate must lie in [0, 1), got {fpr}")
    screener = screener or get_screener(method, preset, params)
    model, device = _model_on(suspect, device)
    pool = suspect.defense_pool
    if n_pool is not None:
        if int(n_pool) < 1:
            raise ValueError(f"n_pool must be at least 1, got {n_pool}")
        pool = pool.subset(torch.arange(min(int(n_pool), len(pool))))
    pool_x = pool.images()
    report = progress or (lambda *_: None)
    report(0.0, f"{screener.title}: fitting on the clean pool", {})
    screener.fit(model, pool_x, device, pool.labels)
    keep = torch.ones(len(pool_x), dtype=torch.bool)
    keep[screener.reserved_pool] = False
    index = torch.nonzero(keep).flatten()
    if len(index) < 10:
        raise ValueError(f"{screener.title}: only {len(index)} clean pool images are left to calibrate the "
                         f"threshold on (at least 10 are needed); use a larger pool")
    scores = screener.scores(model, pool_x[index], device, progress=lambda done: report(
        done / len(index), f"{screener.title}: scoring the clean pool", {"images": done}))
    threshold = calibrate(scores, fpr)
    return Calibration(screener.name, screener, threshold, float(fpr), scores, index, time.perf_counter() - t0)


@dataclass
class ScreenResult:
    """Scores, threshold and (with a known or adopted trigger) the detection quality on the test split."""

    method: str
    title: str
    params: dict[str, Any]
    suspect: str
    fpr_target: float
    threshold: float
    fpr_pool: float
    n_pool: int
    scores_pool: np.ndarray
    scores_clean: np.ndarray
    fpr: float  # share of clean test images above the threshold (the false-positive rate actually observed)
    n_clean: int
    trigger: dict[str, Any] | None = None
    scores_triggered: np.ndarray | None = None
    n_triggered: int = 0
    auroc: float | None = None
    tpr_at_fpr: float | None = None  # share of triggered test images above the threshold
    roc_fpr: list[float] = field(default_factory=list)
    roc_tpr: list[float] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)
    hist_pool: list[int] = field(default_factory=list)
    hist_clean: list[int] = field(default_factory=list)
    hist_triggered: list[int] = field(default_factory=list)
    score_label: str = "score"
    device: str = "cpu"
    seconds_calibration: float = 0.0
    seconds: float = 0.0
    calibration: Calibration | None = field(default=None, repr=False)

    def to_dict(self, scores: bool = False, ndigits: int | None = None) -> dict[str, Any]:
        """JSON-able summary (``scores`` adds the per-image scores; ``ndigits`` rounds every float)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "calibration" or (f.name.startswith("scores_") and not scores):
                continue
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            out[f.name] = value
        return _round(out, ndigits) if ndigits is not None else out


def _round(obj: Any, ndigits: int) -> Any:
    if isinstance(obj, float):
        return round(obj, ndigits) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, ndigits) for v in obj]
    return obj


def _roc_points(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 400) -> tuple[list[float], list[float]]:
    if len(fpr) > max_points:  # thin a long curve, keeping both ends
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return [float(v) for v in fpr], [float(v) for v in tpr]


def screen_suspect(suspect: Suspect, method: str = DEFAULT_METHOD, *, preset: str = "quick",
                   params: dict[str, Any] | None = None, fpr: float = 0.05, n_pool: int | None = None,
                   limit: int | None = None, device: torch.device | str | None = None,
                   progress: Progress | None = None, calibration: Calibration | None = None,
                   bins: int = 40) -> ScreenResult:
    """Screen the suspect's test split with ``method``.

    The threshold comes from clean defense-pool images only (:func:`calibrate_on_pool`, target ``fpr``; pass a
    ``calibration`` to reuse one). The clean test images (the first ``limit`` when given) give the observed FPR;
    with a known or adopted trigger, their triggered copies (all-to-one: target-class images left out, as for the
    ASR) give the AUROC, the ROC curve and the TPR at the threshold.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    t0 = time.perf_counter()
    report = progress or (lambda *_: None)
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be at least 1 test image, got {limit}")
    if calibration is not None and calibration.method != method.lower().replace("_", "-"):
        raise ValueError(f"the calibration is for {calibration.method!r}, not {method!r}")
    model, device = _model_on(suspect, device)
    if calibration is None:
        calibration = calibrate_on_pool(
            suspect, method, preset=preset, params=params, fpr=fpr, n_pool=n_pool, device=device,
            progress=lambda f, m, d: report(0.25 * f, m, d))
    screener = calibration.screener
    test = suspect.test
    if limit is not None:
        test = test.subset(torch.arange(min(int(limit), len(test))))
    x = test.images()
    trigger = suspect.trigger
    mask = trigger.test_mask(test.labels) if trigger is not None else torch.zeros(len(x), dtype=torch.bool)
    total = len(x) + int(mask.sum())

    def tick(offset: int, message: str) -> Callable[[int], None]:
        return lambda done: report(0.25 + 0.75 * (offset + done) / max(1, total), message, {"images": offset + done})

    clean = screener.scores(model, x, device, progress=tick(0, f"{screener.title}: clean test images"))
    t = calibration.threshold
    result = ScreenResult(
        method=screener.name, title=screener.title, params=dataclasses.asdict(screener.params),
        suspect=suspect.name, fpr_target=calibration.fpr_target, threshold=t, fpr_pool=calibration.fpr_pool,
        n_pool=len(calibration.pool_scores), scores_pool=calibration.pool_scores, scores_clean=clean,
        fpr=float((clean > t).mean()) if len(clean) else float("nan"), n_clean=len(clean),
        score_label=screener.score_label, device=str(device), seconds_calibration=calibration.seconds,
        calibration=calibration)
    every = [calibration.pool_scores, clean]
    if trigger is not None and bool(mask.any()):
        xt = torch.cat([trigger(x[mask][i:i + 1024]) for i in range(0, int(mask.sum()), 1024)])
        trig = screener.scores(model, xt, device, progress=tick(len(x), f"{screener.title}: triggered test images"))
        y = np.r_[np.zeros(len(clean)), np.ones(len(trig))]
        s = np.r_[clean, trig]
        roc_f, roc_t, _ = roc_curve(y, s)
        result.roc_fpr, result.roc_tpr = _roc_points(roc_f, roc_t)
        result.trigger, result.scores_triggered, result.n_triggered = trigger.spec(), trig, len(trig)
        result.auroc = float(roc_auc_score(y, s))
        result.tpr_at_fpr = float((trig > t).mean())
        every.append(trig)
    edges = np.histogram_bin_edges(np.concatenate(every), bins=bins)
    result.hist_edges = [float(v) for v in edges]
    result.hist_pool = np.histogram(calibration.pool_scores, edges)[0].tolist()
    result.hist_clean = np.histogram(clean, edges)[0].tolist()
    if result.scores_triggered is not None:
        result.hist_triggered = np.histogram(result.scores_triggered, edges)[0].tolist()
    result.seconds = calibration.seconds + (time.perf_counter() - t0)
    report(1.0, f"{screener.title}: done", {"auroc": result.auroc} if result.auroc is not None else {})
    return result


# --- the user's own images ----------------------------------------------------------------------------------


@dataclass
class ImageVerdict:
    """One screened image: its score, the verdict at the threshold, and the model's prediction."""

    name: str
    score: float
    threshold: float
    flagged: bool
    predicted: int
    predicted_class: str

    @property
    def verdict(self) -> str:
        return "likely triggered" if self.flagged else "looks clean"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verdict": self.verdict}


ImageSource = str | Path | bytes | BinaryIO | Any  # a path, the file's bytes, an open file, or a PIL image


def _describe(source: Any, i: int) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return str(getattr(source, "name", None) or getattr(source, "filename", None) or f"image {i + 1}")


def load_image(source: ImageSource, input_shape: Sequence[int], name: str | None = None) -> torch.Tensor:
    """A PNG or JPEG image as a float tensor (C, H, W) in [0, 1] for a model with input ``input_shape``.

    The image is converted to greyscale (1 channel) or RGB (3 channels) and resized (bilinear) to the model's
    size when it differs. Anything else raises ValueError naming the image: a missing file, a file that is not an
    image, another format, a 16-bit or float pixel mode, an image under 8 pixels a side or over 4096 x 4096.
    """
    from PIL import Image, UnidentifiedImageError

    name = name or _describe(source, 0)
    c, h, w = (int(v) for v in input_shape)
    if c not in (1, 3):
        raise ValueError(f"{name}: the model expects {c}-channel input; only greyscale (1) and RGB (3) models can "
                         f"screen image files")
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (str, Path)) and not Path(source).is_file():
            raise ValueError(f"{name}: no such file")
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
            raise ValueError(f"{name} is not a readable PNG or JPEG image ({type(err).__name__}: {err})") from err
        if img.format not in FORMATS:
            raise ValueError(f"{name} is a {img.format} image; only PNG and JPEG images are accepted")
    iw, ih = img.size
    if iw * ih > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name} is {iw}x{ih} pixels, larger than the 4096x4096 limit")
    if min(iw, ih) < MIN_IMAGE_SIDE:
        raise ValueError(f"{name} is {iw}x{ih} pixels; images need at least {MIN_IMAGE_SIDE} pixels a side to be "
                         f"resized to the model's {w}x{h}")
    if img.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        raise ValueError(f"{name} has pixel mode {img.mode!r} (16-bit, 32-bit or float pixels); save it as an "
                         f"8-bit greyscale or RGB PNG/JPEG")
    try:
        img.load()
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")
        img = img.convert("L" if c == 1 else "RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise ValueError(f"{name} could not be decoded ({type(err).__name__}: {err})") from err
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    return t.float().div_(255.0)


def list_image_files(folder: str | Path) -> list[Path]:
    """The files of ``folder`` to screen (not recursive; hidden files skipped), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder} holds no images")
    return files


def screen_images(suspect: Suspect, method: str, images: Sequence[ImageSource], threshold: float | None = None,
                  *, calibration: Calibration | None = None, names: Sequence[str] | None = None,
                  fpr: float = 0.05, preset: str = "quick", params: dict[str, Any] | None = None,
                  n_pool: int | None = None, device: torch.device | str | None = None) -> list[ImageVerdict]:
    """Score a user's images (paths, bytes, open files or PIL images) and flag those above the threshold.

    The threshold is ``threshold`` when given, else the ``calibration``'s, else one calibrated now on the clean
    pool (target ``fpr``). A ``calibration`` also supplies the fitted screener, so repeated calls cost only the
    images' own forward passes. Every image is loaded (and checked) before anything is scored.
    """
    if not images:
        raise ValueError("no images to screen")
    labels = list(names) if names is not None else [_describe(s, i) for i, s in enumerate(images)]
    x = torch.stack([load_image(s, suspect.input_shape, n) for s, n in zip(images, labels, strict=True)])
    model, device = _model_on(suspect, device)
    if calibration is not None:
        key = method.lower().replace("_", "-")
        if calibration.method != key:
            raise ValueError(f"the calibration is for {calibration.method!r}, not {method!r}")
        screener = calibration.screener
    elif threshold is not None:
        screener = get_screener(method, preset, params)
        pool = suspect.defense_pool
        if n_pool is not None:
            pool = pool.subset(torch.arange(min(int(n_pool), len(pool))))
        screener.fit(model, pool.images(), device, pool.labels)
    else:
        calibration = calibrate_on_pool(suspect, method, preset=preset, params=params, fpr=fpr, n_pool=n_pool,
                                        device=device)
        screener = calibration.screener
    t = float(threshold) if threshold is not None else calibration.threshold  # type: ignore[union-attr]
    scores = screener.scores(model, x, device)
    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval()
            preds = _logits(model, x.to(device), device).argmax(1).cpu().tolist()
    finally:
        model.train(was_training)
    return [ImageVerdict(n, float(s), t, bool(s > t), int(p), suspect.classes[int(p)])
            for n, s, p in zip(labels, scores, preds, strict=True)]
