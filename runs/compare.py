"""Compare the stored runs of one suspect, and any of its models side by side.

- :func:`runs_table`: one row per finished run of a suspect (defense, preset, BA, ASR, RA, DER, seconds, device,
  clean data used, date), with its **Pareto front** (:func:`pareto_front`: no other run has a BA at least as
  high and an ASR at least as low), :func:`filter_runs`, and exports (:func:`table_csv`, :func:`table_json`,
  :func:`format_table`).
- Charts (plotly figures): :func:`tradeoff_figure` (BA vs. ASR with the front and the suspect before any
  defense) and :func:`metric_bars_figure` (one panel per metric).
- Side by side: the same analyses (``analysis.*``) on several models of one suspect (the suspect and repaired
  models, or repaired models only) with the suspect's trigger and the same images: :func:`side_by_side`. Its
  pieces (``activation_summary``, ``embed_features``, ``ablation_curves``, ``compare_gradcam``) and figures
  (``analysis.figures``) are the views' own, re-exported here, which the Compare page calls one at a time.

Used by the Compare page, ``backdoor-lens compare`` and the HTML report (:mod:`runs.report`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import nn

from analysis.activations import activation_summary
from analysis.features import Embedding, embed_features
from analysis.figures import ablation_figure, activations_figure, embedding_figure, gradcam_grid
from analysis.gradcam import GradCamComparison, compare_gradcam, default_target_layer
from analysis.samples import PairedSample, paired_sample
from analysis.shortcuts import AblationResult, NoSkipConnectionsError, ablation_curves
from suspects.metrics import DEFINITIONS, metric_definitions
from suspects.models import list_residual_blocks
from suspects.store import Suspect
from suspects.triggers import Trigger

from .identity import runs_of, same_model
from .stats import (
    STAT_DEFINITIONS,
    front_marks,
    group_stats,
    interval,
    interval_text,
    range_text,
    split_text,
    successes_text,
)
from .store import RunRecord, RunStore
from .stress import load_stress

__all__ = [
    "COLUMNS", "COLUMN_DEFINITIONS", "column_definitions", "METRICS", "METRIC_LABELS", "PARTS", "PART_TITLES", "same_suspect", "runs_table",
    "pareto_front", "filter_runs", "table_records", "table_csv", "table_json", "format_table", "run_label",
    "best_run", "tradeoff_figure", "metric_bars_figure", "Embedding", "with_model", "embed_features", "activation_summary",
    "ablation_curves", "gradcam_grid", "activations_figure", "embedding_figure", "ablation_figure", "SideBySide",
    "side_by_side", "GROUP_KEYS", "GROUP_COLUMNS", "BACKDOORBENCH_COLUMNS", "group_runs", "format_groups",
    "groups_records", "backdoorbench_csv", "mean_sd_text", "GROUP_DEFINITIONS", "GROUP_DISPLAY", "groups_display",
    "split_flag_text",
]

COLUMNS = ["run_id", "defense", "preset", "overrides", "seed", "ba", "asr", "ra", "der", "asr_after_retune", "seconds",
           "device", "clean_images", "held_out", "date", "ba_before", "asr_before", "ra_before", "failed", "pareto",
           "run_dir", "sweep"]
METRICS = ("ba", "asr", "ra", "der")
METRIC_LABELS = {"ba": "BA (benign accuracy)", "asr": "ASR (attack success rate)", "ra": "RA (robust accuracy)",
                 "der": "DER (defense effectiveness rating)"}
COLUMN_DEFINITIONS = {
    "run_id": "the run's id in the run store",
    "defense": "the defense's registered name (`backdoor-lens defenses`)",
    "preset": "parameter preset (quick: a CPU demo; paper: the official settings), before any overrides",
    "overrides": "parameters set away from the preset (name=value)",
    "seed": "the run's random seed (pool draw, initialisation, batch order)",
    "ba": "BA after the defense; " + DEFINITIONS["ba"],
    "asr": "ASR after the defense; " + DEFINITIONS["asr"],
    "ra": "RA after the defense; " + DEFINITIONS["ra"],
    "der": DEFINITIONS["der"],
    "asr_after_retune": "ASR after re-tuning: the run's ASR after the stress test (retuning attack, Min et al., "
                        "NeurIPS 2024: a few epochs of fine-tuning on the pool with 5 poisoned samples); empty "
                        "until the run is stress-tested",
    "seconds": "wall-clock seconds of the run, measuring before and after included",
    "device": "the device the run used",
    "clean_images": "clean defense-pool images given to the defense (never poisoned, never the test split)",
    "held_out": "of those, images held out for the defense's stopping and selection rules",
    "date": "when the run finished (UTC, ISO 8601)",
    "ba_before": "BA of the suspect before the defense, measured by the same run",
    "asr_before": "ASR of the suspect before the defense, measured by the same run",
    "ra_before": "RA of the suspect before the defense, measured by the same run",
    "failed": "the defense reported that it failed and returned the model unchanged (e.g. l_inf pruning gave up "
              "because no few channels carry the trigger); such a run is never on the Pareto front",
    "pareto": "on the Pareto front of the runs listed: no other run has a BA at least as high and an ASR at least "
              "as low, one of them strictly (runs whose defense failed are left out)",
    "run_dir": "the run's folder (the repaired model, its card and report)",
    "sweep": "the sweep that made the run (`backdoor-lens sweep`), if any",
}


def column_definitions(trigger: Trigger | Mapping[str, Any] | None = None) -> dict[str, str]:
    """:data:`COLUMN_DEFINITIONS` with ASR / RA stated for the suspect's ``trigger`` (a Trigger, its spec or None:
    :func:`suspects.metrics.metric_definitions`)."""
    if trigger is None:
        return dict(COLUMN_DEFINITIONS)
    defs = metric_definitions(trigger)
    return {**COLUMN_DEFINITIONS, "asr": "ASR after the defense; " + defs["asr"],
            "ra": "RA after the defense; " + defs["ra"]}
PARTS = ("gradcam", "activations", "features", "ablation")
PART_TITLES = {"gradcam": "Grad-CAM", "activations": "Activation statistics", "features": "Feature space",
               "ablation": "Skip ablation"}


# --- the run table ---------------------------------------------------------------------------------------


def same_suspect(a: str, b: str) -> bool:
    """Whether two suspect references name the same model: the same folder, ``demo:NAME`` and its folder, or the
    same weights and data under another name (:func:`runs.identity.same_model`)."""
    return same_model(a, b)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def runs_table(store: RunStore, suspect: str | None = None, key: str | None = None,
               records: Sequence[RunRecord] | None = None) -> pd.DataFrame:
    """Every finished run of the model ``suspect`` names (under any name: its fingerprint ``key`` is looked up,
    :func:`runs.identity.runs_of`) whose folder is complete, newest first, in the columns ``COLUMNS``; or of the
    given ``records``."""
    rows = []
    if records is None:
        records = runs_of(store, suspect, key)
    for rec in records:
        if rec.status != "finished":
            continue
        rep = store.report(rec.id)
        if rep is None:
            continue
        split = rep.get("pool_split") or {}
        rows.append({
            "run_id": rec.id, "defense": rep.get("defense", rec.defense), "preset": rep.get("preset", rec.preset),
            "overrides": ", ".join(f"{k}={v}" for k, v in sorted(rec.params.items()) if not k.startswith("_")),
            "seed": int(rep.get("seed", rec.seed) or 0),
            **{k: _num(rep.get(k)) for k in ("ba", "asr", "ra", "der", "seconds")},
            "asr_after_retune": _num((load_stress(rep.get("run_dir") or rec.run_dir) or {}).get("asr_after_retune")),
            "device": rep.get("device") or rec.device or "",
            "clean_images": int(rep.get("pool_size", rec.pool_size) or 0),
            "held_out": int(split.get("held_out", 0)),
            "date": str(rep.get("finished", "")),
            **{k: _num(rep.get(k)) for k in ("ba_before", "asr_before", "ra_before")},
            "failed": bool((rep.get("artifacts") or {}).get("failed")), "pareto": False,
            "run_dir": rep.get("run_dir") or rec.run_dir or "",
            "sweep": str(rec.params.get("_sweep") or ""),
        })
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["failed"] = df["failed"].astype(bool)
    df["pareto"] = pareto_front(df["ba"], df["asr"], eligible=~df["failed"])
    return df.reset_index(drop=True)


def pareto_front(ba: Iterable[float], asr: Iterable[float], eligible: Iterable[bool] | None = None) -> np.ndarray:
    """Boolean mask of the points no other point dominates (BA at least as high and ASR at least as low, one
    strictly). Points with an unknown BA or ASR are never on it; when no ASR is known at all (a suspect without
    a trigger) the front is the highest BA. ``eligible``: points marked False (a defense that reported failure,
    i.e. the suspect unchanged) are neither on the front nor dominate others."""
    ba = pd.to_numeric(pd.Series(list(ba), dtype=object), errors="coerce").to_numpy(dtype=float)
    asr = pd.to_numeric(pd.Series(list(asr), dtype=object), errors="coerce").to_numpy(dtype=float)
    if len(ba) and np.isnan(asr).all():
        asr = np.zeros_like(ba)
    ok = np.isfinite(ba) & np.isfinite(asr)
    if eligible is not None:
        ok &= np.asarray(list(eligible), dtype=bool)
    front = np.zeros(len(ba), dtype=bool)
    for i in np.flatnonzero(ok):
        better_or_equal = ok & (ba >= ba[i]) & (asr <= asr[i])
        strictly = (ba > ba[i]) | (asr < asr[i])
        front[i] = not (better_or_equal & strictly).any()
    return front


def _failed(table: pd.DataFrame) -> pd.Series:
    """The ``failed`` column as booleans (all False for a table without it, e.g. one built by hand)."""
    if "failed" not in table:
        return pd.Series(False, index=table.index)
    return table["failed"].fillna(False).astype(bool)


def filter_runs(table: pd.DataFrame, defenses: Sequence[str] | None = None, presets: Sequence[str] | None = None,
                devices: Sequence[str] | None = None, min_ba: float | None = None, max_asr: float | None = None,
                pareto_only: bool = False) -> pd.DataFrame:
    """The runs that pass every given filter; ``pareto`` is recomputed among them (the front of what is shown)."""
    keep = pd.Series(True, index=table.index)
    for col, allowed in (("defense", defenses), ("preset", presets), ("device", devices)):
        if allowed is not None:
            keep &= table[col].isin(list(allowed))
    if min_ba is not None:
        keep &= table["ba"] >= min_ba
    if max_asr is not None:
        keep &= table["asr"].isna() | (table["asr"] <= max_asr)
    out = table[keep].copy()
    out["pareto"] = pareto_front(out["ba"], out["asr"], eligible=~_failed(out))
    if pareto_only:
        out = out[out["pareto"]]
    return out.reset_index(drop=True)


def table_records(table: pd.DataFrame) -> list[dict]:
    """Rows as JSON-able dicts (NaN -> None)."""
    out = []
    for row in table.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else
                        v.item() if isinstance(v, np.generic) else v) for k, v in row.items()})
    return out


def table_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)


def table_json(table: pd.DataFrame, suspect: str, trigger: Trigger | Mapping[str, Any] | None = None) -> str:
    """``{"suspect", "definitions", "runs", "groups", "group_definitions"}``: the rows with every column's definition,
    and the runs grouped by (defense, preset, overrides) with ``ba_mean``, ``ba_sd``, ``asr_median``, ``asr_min``,
    ``asr_max``, ``asr_ci_low``, ``successes``, ``n_judged``, ``split``, ``pareto``, ``near_front``, ``n_seeds``...
    (:func:`group_runs`), each column defined in ``group_definitions``; ASR / RA defined for ``trigger``'s mapping."""
    col_defs = column_definitions(trigger)
    return json.dumps({"suspect": suspect,
                       "definitions": {c: col_defs[c] for c in table.columns if c in col_defs},
                       "runs": table_records(table),
                       "groups": groups_records(group_runs(table)),
                       "group_definitions": GROUP_DEFINITIONS}, indent=2)


MADE_THIS = "the run that made the model under analysis"


def format_table(table: pd.DataFrame, highlight: str | None = None,
                 trigger: Trigger | Mapping[str, Any] | None = None) -> str:
    """A fixed-width text table of the main columns (the Pareto front marked with *), then the definitions.
    ``highlight``: a run id marked ``->`` (the run that made the repaired model under analysis); ``trigger``: the
    suspect's (ASR / RA are defined for its label mapping)."""
    cols = ["run_id", "defense", "preset", "overrides", "ba", "asr", "ra", "der", "asr_after_retune", "seconds", "device",
            "clean_images", "date"]
    show = table[cols].copy()
    for c in ("ba", "asr", "ra", "der", "asr_after_retune"):
        show[c] = [("n/a" if math.isnan(v) else f"{v:.3f}") for v in table[c]]
    show["seconds"] = [f"{v:.1f}" for v in table["seconds"]]
    show["clean_images"] = [f"{n} ({h} held out)" for n, h in zip(table["clean_images"], table["held_out"], strict=True)]
    failed = _failed(table)
    show.insert(0, "", ["*" if p else ("x" if f else "") for p, f in zip(table["pareto"], failed, strict=True)])
    marked = highlight is not None and (table["run_id"] == highlight).any()
    if marked:
        show.insert(0, " ", ["->" if r == highlight else "" for r in table["run_id"]])
    show = show.rename(columns={"ba": "BA", "asr": "ASR", "ra": "RA", "der": "DER", "clean_images": "clean data",
                                "asr_after_retune": "ASR re-tuned"})
    lines = [show.to_string(index=False)]
    lines.append("")
    if marked:
        lines.append(f"-> {MADE_THIS}")
    lines.append("* on the Pareto front: " + COLUMN_DEFINITIONS["pareto"].split(": ", 1)[1])
    if failed.any():
        lines.append("x failed: " + COLUMN_DEFINITIONS["failed"])
    defs = metric_definitions(trigger)
    for key, label in (("ba", "BA"), ("asr", "ASR"), ("ra", "RA"), ("der", "DER")):
        lines.append(f"{label}: {defs[key]}")
    lines.append("clean data: " + COLUMN_DEFINITIONS["clean_images"] + "; " + COLUMN_DEFINITIONS["held_out"])
    lines.append("ASR re-tuned: " + COLUMN_DEFINITIONS["asr_after_retune"].split(": ", 1)[1])
    return "\n".join(lines)


def run_label(row: dict | pd.Series) -> str:
    """``defense · preset · id suffix`` (the id ends in a random hex tag)."""
    return f"{row['defense']} · {row['preset']} · {str(row['run_id']).rsplit('-', 1)[-1]}"


def best_run(table: pd.DataFrame) -> pd.Series | None:
    """The run with the highest DER (then the highest BA), or the highest BA without a trigger; None if empty."""
    if table.empty:
        return None
    key = table["der"].fillna(-1.0) if table["der"].notna().any() else table["ba"]
    order = pd.DataFrame({"k": key, "ba": table["ba"]}).sort_values(["k", "ba"], ascending=False)
    return table.loc[order.index[0]]


# --- spread over seeds: groups of runs of the same (defense, preset, overrides) ------------------------------

GROUP_KEYS = ["defense", "preset", "overrides"]
GROUP_METRICS = ("ba", "asr", "ra", "der", "seconds")
SPREAD_METRICS = ("ba", "asr", "ra", "der", "ba_drop")  # median, range and bootstrap interval (runs.stats)
GROUP_COLUMNS = [*GROUP_KEYS, "n_seeds", *(f"{m}_{s}" for m in GROUP_METRICS for s in ("mean", "sd")), "seeds",
                 "run_ids", "n_failed",
                 *(f"{m}_{s}" for m in SPREAD_METRICS for s in ("median", "min", "max", "ci_low", "ci_high")),
                 "ba_drop_mean", "ba_drop_sd", "successes", "n_judged", "removed", "not_removed", "split", "pareto",
                 "near_front"]
BACKDOORBENCH_COLUMNS = ["attack", "defense", "model", "dataset", "pratio", "clean_acc", "asr", "ra",
                         "clean_acc_sd", "asr_sd", "ra_sd", "der", "der_sd", "n_seeds", "seconds", "seconds_sd",
                         "preset", "overrides"]
GROUP_DEFINITIONS = {
    "n_seeds": STAT_DEFINITIONS["n"],
    **{f"{m}_{s}": f"{m.upper().replace('_DROP', ' drop')}: {STAT_DEFINITIONS[s]}"
       for m in (*GROUP_METRICS, "ba_drop") for s in ("mean", "sd")},
    **{f"{m}_{s}": f"{m.upper().replace('_DROP', ' drop')}: {STAT_DEFINITIONS[s]}"
       for m in SPREAD_METRICS for s in ("median", "min", "max", "ci_low", "ci_high")},
    "seeds": "the runs' seeds", "run_ids": "the runs' ids",
    "n_failed": "runs whose defense reported failure (model returned unchanged)",
    **{k: STAT_DEFINITIONS[k] for k in ("successes", "n_judged", "removed", "not_removed", "split", "pareto",
                                         "near_front")},
}


def _mean_sd(values: pd.Series) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN with fewer than two known values)."""
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def group_runs(table: pd.DataFrame, keys: Sequence[str] = GROUP_KEYS) -> pd.DataFrame:
    """One row per group (default: (defense, preset, overrides)): ``n_seeds`` runs, mean and sd of BA / ASR / RA /
    DER / seconds, ``n_failed`` (runs whose defense reported failure, model unchanged), and the statistics of
    :mod:`runs.stats`: median, range and (n >= 5) bootstrap 95% interval of BA / ASR / RA / DER / BA drop,
    ``successes`` of ``n_judged`` (k/n), the ``split`` flag, and ``pareto`` / ``near_front`` on the groups' means
    (:func:`runs.stats.front_marks`; a group that gave up at every run is on neither).

    Used by ``compare``, ``defend --seeds``, ``sweep``, the Compare page, the report and the benchmark; the sd is the
    sample standard deviation over the group's runs (NaN for a single run). Definitions: ``GROUP_DEFINITIONS``.
    """
    keys = list(keys)
    stats = group_stats(table, keys, metrics=(*GROUP_METRICS, "ba_drop"))
    rows = []
    for (key, g), (_, st) in zip(table.groupby(keys, sort=True, dropna=False), stats.iterrows(), strict=True):
        key = key if isinstance(key, tuple) else (key,)
        row: dict = dict(zip(keys, key, strict=True))
        row["n_seeds"] = int(len(g))
        for m in GROUP_METRICS:
            row[f"{m}_mean"], row[f"{m}_sd"] = _mean_sd(g[m])
        row["seeds"] = sorted(int(x) for x in g["seed"]) if "seed" in g else []
        row["run_ids"] = list(g["run_id"]) if "run_id" in g else []
        row["n_failed"] = int(_failed(g).sum())
        for m in SPREAD_METRICS:
            for s in ("median", "min", "max", "ci_low", "ci_high"):
                row[f"{m}_{s}"] = st.get(f"{m}_{s}", float("nan"))
        row["ba_drop_mean"], row["ba_drop_sd"] = st.get("ba_drop_mean", float("nan")), st.get("ba_drop_sd", float("nan"))
        for c in ("successes", "n_judged", "removed", "not_removed", "split"):
            row[c] = st[c]
        rows.append(row)
    out = pd.DataFrame(rows, columns=[*keys, *(c for c in GROUP_COLUMNS if c not in GROUP_KEYS)])
    if out.empty:
        return out
    gave_up = out["n_failed"] >= out["n_seeds"]
    out["pareto"], out["near_front"] = front_marks(out, eligible=~gave_up, n_col="n_seeds")
    return out


def mean_sd_text(mean: float | None, sd: float | None, digits: int = 3) -> str:
    """``"0.860 ± 0.016"``; the mean alone when there is no sd (one run), ``"n/a"`` without a mean."""
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if sd is None or math.isnan(sd) else f" ± {sd:.{digits}f}")


def split_flag_text(row: dict | pd.Series) -> str:
    """``"split: 1 of 3 removed"`` for a group whose runs split (``runs.stats``), else ``""``."""
    return split_text(int(row["removed"]), int(row["n_seeds"])) if row["split"] else ""


def _front_mark(row: dict | pd.Series) -> str:
    return "*" if row["pareto"] else ("~" if row["near_front"] else "")


# the columns of the groups' display table (text, page, report) and what each one shows
GROUP_DISPLAY = {
    "front": "* on the Pareto front of the groups' means; ~ near it: " + STAT_DEFINITIONS["near_front"],
    "n": STAT_DEFINITIONS["n"],
    "BA mean ± sd": "BA (benign accuracy): mean ± sample sd over the group's runs",
    "BA median [range]": "BA: median [min, max] over the group's runs",
    "ASR mean ± sd": "ASR (attack success rate): mean ± sample sd over the group's runs",
    "ASR median [range]": "ASR: median [min, max] over the group's runs",
    "ASR 95% CI": "ASR: " + STAT_DEFINITIONS["ci"],
    "RA mean ± sd": "RA (robust accuracy): mean ± sample sd over the group's runs",
    "DER mean ± sd": "DER (defense effectiveness rating): mean ± sample sd over the group's runs",
    "k/n": STAT_DEFINITIONS["successes"],
    "split": STAT_DEFINITIONS["split"],
    "seconds": "wall-clock seconds per run: mean ± sample sd",
}


def groups_display(groups: pd.DataFrame) -> pd.DataFrame:
    """The groups as text cells in the columns ``GROUP_DISPLAY`` (after defense, preset, overrides): the one table
    the CLI, the Compare page and the HTML report show."""
    show = groups[GROUP_KEYS].copy()
    show.insert(0, "front", [_front_mark(r) for _, r in groups.iterrows()])
    show["n"] = groups["n_seeds"].astype(int)
    for m, label in (("ba", "BA"), ("asr", "ASR")):
        show[f"{label} mean ± sd"] = [mean_sd_text(a, b) for a, b in zip(groups[f"{m}_mean"], groups[f"{m}_sd"],
                                                                          strict=True)]
        show[f"{label} median [range]"] = [range_text(md, lo, hi) for md, lo, hi in
                                           zip(groups[f"{m}_median"], groups[f"{m}_min"], groups[f"{m}_max"],
                                               strict=True)]
    show["ASR 95% CI"] = [interval_text(lo, hi) or "n < 5" for lo, hi in
                          zip(groups["asr_ci_low"], groups["asr_ci_high"], strict=True)]
    for m, label in (("ra", "RA"), ("der", "DER")):
        show[f"{label} mean ± sd"] = [mean_sd_text(a, b) for a, b in zip(groups[f"{m}_mean"], groups[f"{m}_sd"],
                                                                          strict=True)]
    show["k/n"] = [successes_text(int(k), int(n)) for k, n in zip(groups["successes"], groups["n_judged"],
                                                                    strict=True)]
    show["split"] = [split_flag_text(r) for _, r in groups.iterrows()]
    show["seconds"] = [mean_sd_text(a, b, 1) for a, b in zip(groups["seconds_mean"], groups["seconds_sd"], strict=True)]
    return show.reset_index(drop=True)


def format_groups(groups: pd.DataFrame) -> str:
    """A fixed-width text table (:func:`groups_display`), then what each column means."""
    lines = [groups_display(groups).to_string(index=False), ""]
    lines += [f"{k}: {v}" for k, v in GROUP_DISPLAY.items()]
    return "\n".join(lines)


def groups_records(groups: pd.DataFrame) -> list[dict]:
    """Groups as JSON-able dicts (NaN -> None): ``ba_mean``, ``ba_sd``, ``asr_median``, ``asr_min``, ``asr_ci_low``,
    ``successes``, ``n_judged``, ``split``, ``near_front``... (definitions: ``GROUP_DEFINITIONS``)."""
    return table_records(groups)


def backdoorbench_csv(groups: pd.DataFrame, card: dict) -> str:
    """The groups in the columns of BackdoorBench's leaderboard (``attack, defense, model, dataset, pratio,
    clean_acc, asr, ra``, in percent as the leaderboard shows them) plus our sd, DER, n and seconds columns.

    ``card``: the suspect's card (attack, architecture, data set and poisoning rate come from it).
    """
    trig = card.get("trigger") or {}
    data = card.get("data") or {}
    rate = (card.get("poison") or {}).get("rate")
    rows = []
    for _, g in groups.iterrows():
        def pct(v: float) -> float:
            return float("nan") if math.isnan(v) else round(100 * float(v), 2)

        rows.append({
            "attack": trig.get("name", "") if isinstance(trig, dict) else "",
            "defense": g["defense"], "model": card.get("arch", ""),
            "dataset": data.get("name", "") if isinstance(data, dict) else str(data),
            "pratio": rate if rate is not None else "",
            "clean_acc": pct(g["ba_mean"]), "asr": pct(g["asr_mean"]), "ra": pct(g["ra_mean"]),
            "clean_acc_sd": pct(g["ba_sd"]), "asr_sd": pct(g["asr_sd"]), "ra_sd": pct(g["ra_sd"]),
            "der": pct(g["der_mean"]), "der_sd": pct(g["der_sd"]), "n_seeds": int(g["n_seeds"]),
            "seconds": round(float(g["seconds_mean"]), 2), "seconds_sd": round(float(g["seconds_sd"]), 2)
            if not math.isnan(g["seconds_sd"]) else float("nan"),
            "preset": g["preset"], "overrides": g["overrides"],
        })
    return pd.DataFrame(rows, columns=BACKDOORBENCH_COLUMNS).to_csv(index=False)


# --- run charts --------------------------------------------------------------------------------------------


def _defense_colors(defenses: Iterable[str]) -> dict[str, str]:
    palette = px.colors.qualitative.Plotly
    return {d: palette[i % len(palette)] for i, d in enumerate(sorted(set(defenses)))}


def tradeoff_figure(table: pd.DataFrame, height: int = 420) -> go.Figure:
    """BA (y) vs. ASR (x) of every run (an x where the defense reported failure), the Pareto front as a step line,
    and the suspect before any defense; a setting run with several seeds also shows its mean (a diamond) with its
    interval as error bars (the range for n < 5, the bootstrap 95% interval of the mean for n >= 5: :mod:`runs.stats`),
    filled when the group is on the front of the groups' means, hollow with a thick rim when its interval reaches
    that front (``near_front``: the difference is within noise) (:func:`group_runs`)."""
    fig = go.Figure()
    colors = _defense_colors(table["defense"])
    has_asr = table["asr"].notna().any()
    x_of = (lambda t: t["asr"]) if has_asr else (lambda t: t["seconds"])
    for defense, t in table.groupby("defense", sort=True):
        failed = _failed(t)
        fig.add_trace(go.Scatter(
            x=x_of(t), y=t["ba"], mode="markers", name=defense,
            marker=dict(size=[13 if p else 9 for p in t["pareto"]], color=colors[defense],
                        symbol=["x" if f else "circle" for f in failed],
                        line=dict(width=[2 if p else 0 for p in t["pareto"]], color="black")),
            customdata=np.stack([t["run_id"], t["preset"], t["der"].round(3), t["ra"].round(3),
                                 ["<br>the defense failed: model unchanged" if f else "" for f in failed]], axis=1),
            hovertemplate="%{customdata[0]}<br>preset %{customdata[1]}%{customdata[4]}<br>BA %{y:.3f}<br>"
                          + ("ASR %{x:.3f}<br>RA %{customdata[3]}<br>DER %{customdata[2]}" if has_asr
                             else "%{x:.1f} s") + "<extra>%{fullData.name}</extra>"))
    spread = group_runs(table)
    if has_asr and not spread.empty:  # several runs of one setting: their mean with its interval
        lo_ba, hi_ba = interval(spread, "ba", "n_seeds")
        lo_asr, hi_asr = interval(spread, "asr", "n_seeds")
        spread = spread.assign(lo_ba=lo_ba, hi_ba=hi_ba, lo_asr=lo_asr, hi_asr=hi_asr)
        spread = spread[spread["n_seeds"] > 1]
    if has_asr and not spread.empty:
        for defense, g in spread.groupby("defense", sort=True):
            # filled: the groups' front (on means); hollow with a thick rim: near it (interval reaches it); small
            # and hollow: neither
            fig.add_trace(go.Scatter(
                x=g["asr_mean"], y=g["ba_mean"], mode="markers", name=f"{defense} mean (interval)",
                marker=dict(symbol=["diamond" if p else "diamond-open" for p in g["pareto"]],
                            size=[16 if p or q else 11 for p, q in zip(g["pareto"], g["near_front"], strict=True)],
                            color=colors[defense],
                            line=dict(width=[3 if q else 1.5 for q in g["near_front"]], color=colors[defense])),
                error_x=dict(type="data", symmetric=False, array=(g["hi_asr"] - g["asr_mean"]).fillna(0).tolist(),
                             arrayminus=(g["asr_mean"] - g["lo_asr"]).fillna(0).tolist(), visible=True),
                error_y=dict(type="data", symmetric=False, array=(g["hi_ba"] - g["ba_mean"]).fillna(0).tolist(),
                             arrayminus=(g["ba_mean"] - g["lo_ba"]).fillna(0).tolist(), visible=True),
                customdata=np.stack([g["preset"], g["overrides"], g["n_seeds"], g["ba_sd"].round(3),
                                     g["asr_sd"].round(3),
                                     [f"{int(k)}/{int(n)}" for k, n in zip(g["successes"], g["n_judged"], strict=True)],
                                     ["<br>on the front (means)" if p else "<br>near the front (within its interval)"
                                      if q else "" for p, q in zip(g["pareto"], g["near_front"], strict=True)],
                                     ["<br>" + split_flag_text(r) if r["split"] else "" for _, r in g.iterrows()]],
                                    axis=1),
                hovertemplate="preset %{customdata[0]} %{customdata[1]}<br>%{customdata[2]} runs, "
                              "%{customdata[5]} successes%{customdata[7]}%{customdata[6]}<br>"
                              "BA %{y:.3f} ± %{customdata[3]}<br>ASR %{x:.3f} ± %{customdata[4]}"
                              "<extra>%{fullData.name}</extra>"))
    front = table[table["pareto"]].sort_values(["asr", "ba"] if has_asr else ["seconds", "ba"])
    if has_asr and len(front) > 0:
        fig.add_trace(go.Scatter(x=front["asr"], y=front["ba"], mode="lines", name="Pareto front",
                                 line=dict(shape="hv", dash="dash", color="black", width=1.5), hoverinfo="skip"))
    if has_asr and table["ba_before"].notna().any():
        fig.add_trace(go.Scatter(x=[table["asr_before"].median()], y=[table["ba_before"].median()], mode="markers",
                                 name="suspect (before)", marker=dict(symbol="star", size=16, color="#d62728"),
                                 hovertemplate="before any defense<br>BA %{y:.3f}<br>ASR %{x:.3f}<extra></extra>"))
    fig.update_layout(height=height, margin=dict(t=30, b=10, l=10, r=10), legend_title_text="",
                      legend=dict(orientation="h", yanchor="top", y=-0.18, x=0),
                      xaxis_title=METRIC_LABELS["asr"] + " — lower is better" if has_asr else "seconds",
                      yaxis_title=METRIC_LABELS["ba"] + " — higher is better", title="BA vs. ASR")
    if has_asr:
        fig.update_xaxes(range=[-0.03, 1.03])
    return fig


def metric_bars_figure(table: pd.DataFrame, metrics: Sequence[str] = METRICS, height: int = 380) -> go.Figure:
    """One panel per metric (titled BA, ASR, RA, DER: see ``METRIC_LABELS``), one bar per run (coloured by
    defense); dashed: the suspect before the defense."""
    metrics = [m for m in metrics if table[m].notna().any()] or ["ba"]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[m.upper() for m in metrics],
                        shared_yaxes=True, horizontal_spacing=0.03)
    colors = _defense_colors(table["defense"])
    labels = np.array([run_label(r) for _, r in table.iterrows()], dtype=object)
    shown: set[str] = set()
    for col, m in enumerate(metrics, start=1):
        for defense in sorted(set(table["defense"])):
            sel = (table["defense"] == defense).to_numpy()
            fig.add_trace(go.Bar(x=labels[sel], y=table.loc[sel, m], name=defense,
                                 marker_color=colors[defense], legendgroup=defense, showlegend=defense not in shown,
                                 hovertemplate="%{x}<br>" + m.upper() + " %{y:.3f}<extra></extra>"), row=1, col=col)
            shown.add(defense)
        before = table.get(f"{m}_before")
        if before is not None and before.notna().any():
            fig.add_hline(y=float(before.median()), line_dash="dash", line_color="#d62728", row=1, col=col)
    fig.update_yaxes(range=[0, 1.02])
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(height=height, margin=dict(t=40, b=10, l=10, r=10), barmode="group",
                      legend_title_text="defense")
    return fig


# --- side by side: the analyses --------------------------------------------------------------------------
# Each view is computed by one function in analysis/ and drawn by one in analysis.figures (re-exported here):
# the Compare page, the HTML report and the view's own page call the same two.


def with_model(base: Suspect, model: nn.Module) -> Suspect:
    """``base`` (card, data, trigger) with another model; data already loaded is shared, not loaded again."""
    twin = dataclasses.replace(base, model=model)
    if "data" in base.__dict__:  # functools.cached_property keeps its value in the instance dict
        twin.__dict__["data"] = base.__dict__["data"]
    return twin


@dataclass
class SideBySide:
    """The analyses of several models on the same images: per part, model label -> result (absent when the
    part does not apply, with the reason in ``notes``)."""

    labels: list[str]
    sample: PairedSample | None
    layer: str | None
    gradcam: dict[str, GradCamComparison] = field(default_factory=dict)
    activations: dict[str, pd.DataFrame] = field(default_factory=dict)
    features: dict[str, Embedding] = field(default_factory=dict)
    ablation: dict[str, AblationResult] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def side_by_side(models: dict[str, Suspect], base: Suspect, n: int = 200, cam_images: int = 16, seed: int = 0,
                 parts: Sequence[str] = PARTS, embedding: str = "PCA",
                 progress: Callable[[float, str, dict], None] | None = None) -> SideBySide:
    """Run ``parts`` on every model in ``models`` (label -> suspect) with ``base``'s test split and trigger.

    Grad-CAM uses ``cam_images`` images and ``base``'s default target layer; activations, features and skip
    ablation use ``n`` images.
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    report = progress or (lambda f, m, d: None)
    trigger = base.trigger
    layer = default_target_layer(base.model, base.input_shape)
    out = SideBySide(list(models), None, layer)
    no_trigger = "no trigger is known for this suspect"
    if trigger is None:
        for p in ("gradcam", "activations", "ablation"):
            if p in parts:
                out.notes[p] = no_trigger
    elif not list_residual_blocks(base.model) and "ablation" in parts:
        out.notes["ablation"] = f"{base.card.get('arch')} has no skip connections"
    steps = max(1, len(models) * len(parts))
    done = 0
    cam_sample = paired_sample(base.test, trigger, cam_images, seed) if trigger is not None else None
    act_sample = paired_sample(base.test, trigger, n, seed) if trigger is not None else None
    out.sample = cam_sample
    for label, s in models.items():
        model = s.model.eval()
        for part in parts:
            report(done / steps, f"{PART_TITLES[part]}: {label}", {})
            done += 1
            if part in out.notes:
                continue
            if part == "gradcam":
                out.gradcam[label] = compare_gradcam(model, cam_sample, trigger, layer)
            elif part == "activations":
                out.activations[label] = activation_summary(model, act_sample)
            elif part == "features":
                out.features[label] = embed_features(with_model(base, model), n, embedding, seed)
            elif part == "ablation":
                try:
                    out.ablation[label] = ablation_curves(model, base.test, trigger, n)
                except NoSkipConnectionsError as err:
                    out.notes["ablation"] = str(err)
    report(1.0, "done", {})
    return out
