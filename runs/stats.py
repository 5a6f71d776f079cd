"""Statistics of a group of runs: one definition for Compare (page, ``compare --json`` and text, the HTML report)
and the defense benchmark (``scripts/benchmark.py``).

A *group* is any set of runs of one setting: the runs of one (defense, preset, overrides) on a suspect over seeds
(Compare), or one benchmark cell, (defense, preset, overrides) x attack over the attack's test suspects x seeds.
For each metric a group gets n, mean +- sample sd, the **median and range** (min, max), and where n >= 5 a
**percentile-bootstrap 95% interval of the mean** (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993,
ch. 13; seeded, so the same runs always give the same interval). Mean +- sd hides bimodal outcomes (the backdoor
removed at one seed, untouched at another), so a group also counts its **successes** (k/n: ASR <= 0.05 at a BA drop
<= 0.03, the benchmark's goal applied per run) and says when its runs **split** into removed (ASR <= 0.05) and not
removed (ASR >= 0.5).

The **Pareto front** stays on the means (:func:`front_marks`); a row that is not on it but whose interval (range
for n < 5, the bootstrap interval for n >= 5) reaches a point no front row dominates is **near the front**: its
distance from the front is within the runs' spread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "SUCCESS_MAX_ASR", "SUCCESS_MAX_BA_DROP", "REMOVED_MAX_ASR", "NOT_REMOVED_MIN_ASR", "BOOTSTRAP_MIN_N",
    "BOOTSTRAP_LEVEL", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "STAT_METRICS", "STAT_DEFINITIONS", "Spread",
    "spread", "bootstrap_mean_interval", "success_counts", "split_counts", "split_text", "successes_text",
    "group_stats", "interval", "front_marks", "range_text", "interval_text",
]

# A run *succeeds* when the backdoor is gone at a small cost: ASR <= 0.05 at a BA drop (before - after) <= 0.03
# (issue 28; the benchmark's per-attack goal applied to each run).
SUCCESS_MAX_ASR = 0.05
SUCCESS_MAX_BA_DROP = 0.03
# A group *splits* when some of its runs removed the backdoor (ASR <= 0.05) and others left it (ASR >= 0.5).
REMOVED_MAX_ASR = 0.05
NOT_REMOVED_MIN_ASR = 0.5
# The bootstrap interval of the mean: from n >= 5 runs, 95%, 10,000 resamples, a fixed seed (deterministic).
BOOTSTRAP_MIN_N = 5
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

STAT_METRICS = ("ba", "asr", "ra", "der", "seconds", "ba_drop")

STAT_DEFINITIONS = {
    "n": "runs in the group (suspects x seeds)",
    "mean": "mean over the group's runs",
    "sd": "sample standard deviation over the group's runs (ddof 1; none for a single run)",
    "median": "median over the group's runs",
    "min": "smallest value among the group's runs",
    "max": "largest value among the group's runs",
    "range": "[min, max] over the group's runs",
    "ci_low": f"lower end of the percentile-bootstrap {BOOTSTRAP_LEVEL:.0%} interval of the mean "
              f"({BOOTSTRAP_RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}); only where n >= {BOOTSTRAP_MIN_N}",
    "ci_high": f"upper end of the percentile-bootstrap {BOOTSTRAP_LEVEL:.0%} interval of the mean; only where "
               f"n >= {BOOTSTRAP_MIN_N}",
    "ci": f"percentile-bootstrap {BOOTSTRAP_LEVEL:.0%} interval of the mean ({BOOTSTRAP_RESAMPLES:,} resamples, seed "
          f"{BOOTSTRAP_SEED}); only where n >= {BOOTSTRAP_MIN_N} runs",
    "successes": f"k/n successes: runs with ASR <= {SUCCESS_MAX_ASR} at a BA drop (before - after) <= "
                 f"{SUCCESS_MAX_BA_DROP}, of the runs whose ASR and BA drop are known",
    "n_judged": "runs whose ASR and BA drop are known (the n of k/n)",
    "removed": f"runs with ASR <= {REMOVED_MAX_ASR} (backdoor removed)",
    "not_removed": f"runs with ASR >= {NOT_REMOVED_MIN_ASR} (backdoor left in place)",
    "split": f"the group's runs split: at least one removed the backdoor (ASR <= {REMOVED_MAX_ASR}) and at least one "
             f"left it (ASR >= {NOT_REMOVED_MIN_ASR}); the mean describes none of them ('split: k of n removed')",
    "pareto": "on the Pareto front of the groups' means: no other group has a mean BA at least as high and a mean ASR "
              "at least as low, one of them strictly (a group whose defense gave up at every run is left out)",
    "near_front": f"not on the front, but within noise of it: the best corner of the group's interval (highest BA, "
                  f"lowest ASR; the range for n < {BOOTSTRAP_MIN_N}, the bootstrap interval for n >= "
                  f"{BOOTSTRAP_MIN_N}) is dominated by no front group's means",
}


@dataclass(frozen=True)
class Spread:
    """The spread of one metric over a group's runs (NaN where undefined)."""

    n: int
    mean: float
    sd: float
    median: float
    min: float
    max: float
    ci_low: float
    ci_high: float

    @property
    def interval(self) -> tuple[float, float]:
        """The interval a comparison uses: the bootstrap interval where n >= 5, else the range."""
        if self.n >= BOOTSTRAP_MIN_N and not math.isnan(self.ci_low):
            return self.ci_low, self.ci_high
        return self.min, self.max


def _values(values: Iterable) -> np.ndarray:
    return pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").dropna().to_numpy(dtype=float)


def bootstrap_mean_interval(values: Iterable[float], level: float = BOOTSTRAP_LEVEL,
                            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean (Efron & Tibshirani 1993): ``resamples`` draws of n values with
    replacement, the (1 - level) / 2 and (1 + level) / 2 quantiles of their means. Deterministic for a given
    ``seed``; NaN for no values."""
    v = _values(values)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def spread(values: Iterable[float]) -> Spread:
    """n, mean, sample sd, median, min, max and (n >= ``BOOTSTRAP_MIN_N``) the bootstrap interval of the mean of the
    known values (NaN / None are left out)."""
    v = _values(values)
    if len(v) == 0:
        nan = float("nan")
        return Spread(0, nan, nan, nan, nan, nan, nan, nan)
    lo, hi = bootstrap_mean_interval(v) if len(v) >= BOOTSTRAP_MIN_N else (float("nan"), float("nan"))
    return Spread(len(v), float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                  float(np.median(v)), float(v.min()), float(v.max()), lo, hi)


def success_counts(asr: Iterable[float], ba_drop: Iterable[float]) -> tuple[int, int]:
    """(k, n): of the n runs whose ASR and BA drop are known, the k with ASR <= ``SUCCESS_MAX_ASR`` at a BA drop
    <= ``SUCCESS_MAX_BA_DROP``."""
    a = pd.to_numeric(pd.Series(list(asr), dtype=object), errors="coerce").to_numpy(dtype=float)
    d = pd.to_numeric(pd.Series(list(ba_drop), dtype=object), errors="coerce").to_numpy(dtype=float)
    known = np.isfinite(a) & np.isfinite(d)
    ok = known & (a <= SUCCESS_MAX_ASR + 1e-12) & (d <= SUCCESS_MAX_BA_DROP + 1e-12)
    return int(ok.sum()), int(known.sum())


def split_counts(asr: Iterable[float]) -> tuple[int, int, int]:
    """(removed, not removed, n): runs with ASR <= ``REMOVED_MAX_ASR``, runs with ASR >= ``NOT_REMOVED_MIN_ASR``,
    runs with a known ASR. The group splits when both counts are positive."""
    a = _values(asr)
    return int((a <= REMOVED_MAX_ASR + 1e-12).sum()), int((a >= NOT_REMOVED_MIN_ASR).sum()), len(a)


def split_text(removed: int, n: int) -> str:
    """``"split: 2 of 3 removed"``."""
    return f"split: {removed} of {n} removed"


def successes_text(k: int, n: int) -> str:
    """``"2/3"``, or ``"n/a"`` when no run could be judged."""
    return f"{k}/{n}" if n else "n/a"


def _fmt(v: float, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def range_text(median: float, lo: float, hi: float, digits: int = 3) -> str:
    """``"0.040 [0.010, 0.300]"``: the median and the range; the value alone when min == max (one run)."""
    if median is None or math.isnan(median):
        return "n/a"
    if lo == hi:
        return _fmt(median, digits)
    return f"{_fmt(median, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def interval_text(lo: float, hi: float, digits: int = 3) -> str:
    """``"[0.010, 0.300]"``, or ``""`` when there is no interval (n < 5)."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return ""
    return f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def group_stats(table: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str] = STAT_METRICS) -> pd.DataFrame:
    """One row per group of ``table`` (grouped by ``keys``, sorted): ``n`` and, per metric present in the table,
    ``{m}_mean``, ``{m}_sd``, ``{m}_median``, ``{m}_min``, ``{m}_max``, ``{m}_ci_low``, ``{m}_ci_high``; then
    ``successes``, ``n_judged`` (k/n), ``removed``, ``not_removed`` and ``split``.

    The BA drop is ``ba_drop`` where the table has it, else ``ba_before - ba`` where it has ``ba_before``.
    """
    if "ba_drop" not in table and {"ba", "ba_before"} <= set(table.columns):
        table = table.assign(ba_drop=pd.to_numeric(table["ba_before"], errors="coerce")
                             - pd.to_numeric(table["ba"], errors="coerce"))
    present = [m for m in metrics if m in table]
    rows = []
    for key, g in table.groupby(list(keys), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict = dict(zip(keys, key, strict=True))
        row["n"] = int(len(g))
        for m in present:
            s = spread(g[m])
            for part in ("mean", "sd", "median", "min", "max", "ci_low", "ci_high"):
                row[f"{m}_{part}"] = getattr(s, part)
        asr = g["asr"] if "asr" in g else pd.Series(np.nan, index=g.index)
        drop = g["ba_drop"] if "ba_drop" in g else pd.Series(np.nan, index=g.index)
        row["successes"], row["n_judged"] = success_counts(asr, drop)
        row["removed"], row["not_removed"], _ = split_counts(asr)
        row["split"] = bool(row["removed"] and row["not_removed"])
        rows.append(row)
    cols = [*keys, "n", *(f"{m}_{p}" for m in present
                          for p in ("mean", "sd", "median", "min", "max", "ci_low", "ci_high")),
            "successes", "n_judged", "removed", "not_removed", "split"]
    return pd.DataFrame(rows, columns=cols)


def interval(groups: pd.DataFrame, metric: str, n_col: str = "n") -> tuple[np.ndarray, np.ndarray]:
    """Per group, the interval of ``metric`` a comparison uses: the bootstrap interval where n >= 5 (and known),
    else the range [min, max]."""
    n = groups[n_col].to_numpy(dtype=float)
    lo, hi = groups[f"{metric}_ci_low"].to_numpy(dtype=float), groups[f"{metric}_ci_high"].to_numpy(dtype=float)
    boot = (n >= BOOTSTRAP_MIN_N) & np.isfinite(lo) & np.isfinite(hi)
    return (np.where(boot, lo, groups[f"{metric}_min"].to_numpy(dtype=float)),
            np.where(boot, hi, groups[f"{metric}_max"].to_numpy(dtype=float)))


def front_marks(groups: pd.DataFrame, eligible: Iterable[bool] | None = None,
                n_col: str = "n") -> tuple[np.ndarray, np.ndarray]:
    """(on the front, near the front) per group: the Pareto front of the means (``ba_mean`` high, ``asr_mean`` low;
    :func:`runs.compare.pareto_front`'s rule), and the groups off it whose interval's best corner (highest BA,
    lowest ASR: :func:`interval`) no front group's means dominate: within the runs' spread of the front.
    ``eligible``: groups marked False (a defense that gave up at every run) are neither."""
    ba = groups["ba_mean"].to_numpy(dtype=float)
    asr = groups["asr_mean"].to_numpy(dtype=float)
    no_asr = len(ba) > 0 and np.isnan(asr).all()
    if no_asr:  # no trigger known: the front is the highest BA
        asr = np.zeros_like(ba)
    ok = np.isfinite(ba) & np.isfinite(asr)
    if eligible is not None:
        ok &= np.asarray(list(eligible), dtype=bool)
    front = np.zeros(len(ba), dtype=bool)
    for i in np.flatnonzero(ok):
        front[i] = not (ok & (ba >= ba[i]) & (asr <= asr[i]) & ((ba > ba[i]) | (asr < asr[i]))).any()
    _, ba_best = interval(groups, "ba", n_col)
    if no_asr:
        asr_best = asr
    else:
        asr_best, _ = interval(groups, "asr", n_col)
    near = np.zeros(len(ba), dtype=bool)
    fb, fa = ba[front], asr[front]
    for i in np.flatnonzero(ok & ~front):
        b, a = ba_best[i], asr_best[i]
        if not (np.isfinite(b) and np.isfinite(a)):
            continue
        dominated = ((fb >= b) & (fa <= a) & ((fb > b) | (fa < a))).any()
        near[i] = not dominated
    return front, near
