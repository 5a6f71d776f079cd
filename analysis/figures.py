"""The views' figures, drawn in one place: plotly figures (and composed images) from the results of ``analysis.*``.

Every view has one function that computes it and one that draws it; the dashboard pages, the Compare page's side
by side and the HTML report call the same two, so a view looks and reads the same everywhere. Plotly only: no
Streamlit here, so a notebook can show (``fig.show()``) or save (``fig.write_html``) the same charts.

=====================  =====================================================  ==========================================
view                   computed by                                            drawn by
=====================  =====================================================  ==========================================
Grad-CAM               :func:`analysis.gradcam.compare_gradcam`               :func:`gradcam_grid` (an image)
activation statistics  :func:`analysis.activations.activation_stats`          :func:`activations_figure`,
                       (:func:`~analysis.activations.activation_summary`)     :func:`norm_histogram_figure`,
                                                                              :func:`norm_box_figure`
feature space          :func:`analysis.features.feature_set` +                :func:`embedding_figure`
                       :func:`~analysis.features.embed`
                       (:func:`~analysis.features.embed_features`)
skip ablation          :func:`analysis.shortcuts.ablation_curves`             :func:`ablation_figure`
detection              :func:`analysis.reverse.scan_suspect`                  :func:`anomaly_figure`,
                       (Neural Cleanse, Wang et al., IEEE S&P 2019)           :func:`mask_norm_figure`, :func:`mask_grid`
input screening        :func:`analysis.screening.screen_suspect`              :func:`screening_histogram_figure`,
                       (STRIP, SCALE-UP, IBD-PSC)                             :func:`roc_figure`
=====================  =====================================================  ==========================================

The side-by-side figures take ``{model label: result}``; with one model they draw that model alone (the layout of
the view's own page), with several one panel (or bar group) per model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .activations import NORMS, ActivationStats
from .features import Embedding
from .gradcam import GradCamComparison, cam_overlay
from .samples import PairedSample
from .screening import ScreenResult
from .shortcuts import AblationResult

if TYPE_CHECKING:
    from .reverse import ReverseResult

__all__ = [
    "NORM_LABELS", "KIND_SYMBOLS", "KIND_COLORS", "gradcam_grid", "activations_figure", "norm_histogram_figure",
    "norm_box_figure", "embedding_figure", "ablation_figure", "class_labels", "anomaly_figure", "mask_norm_figure",
    "mask_tiles", "mask_grid", "mask_pattern_tile", "scale_groups", "lines_figure", "progress_axis",
    "screening_histogram_figure", "roc_figure", "footprint_tile", "framed",
]

NORM_LABELS = {"l1": "l1 = Σ|A|", "l2": "l2 = (ΣA²)^½", "linf": "l_inf = max|A|"}
CONDITION_COLORS = {"clean": "#1f77b4", "triggered": "#d62728"}
KIND_COLORS = {"clean test": "#7f9fbf", "triggered test": "#d62728", "clean train": "#c7c7c7",
               "poisoned train": "#ff7f0e"}
KIND_SYMBOLS = {"clean test": "circle", "triggered test": "x", "clean train": "circle-open", "poisoned train": "diamond"}
FLAGGED, NOT_FLAGGED = "#d62728", "#7f7f7f"


# --- Grad-CAM ----------------------------------------------------------------------------------------------


def gradcam_grid(sample: PairedSample, result: GradCamComparison, k: int = 8, scale: int = 3, gap: int = 2
                 ) -> np.ndarray:
    """One uint8 image: the first ``k`` clean overlays (:func:`~analysis.gradcam.cam_overlay`) on top, their
    triggered copies below."""
    k = min(k, len(sample))
    rows = []
    for images, cams in ((sample.clean, result.clean_cams), (sample.triggered, result.triggered_cams)):
        tiles = [cam_overlay(images[i], cams[i], scale) for i in range(k)]
        h, w = tiles[0].shape[:2]
        row = np.full((h, k * w + (k - 1) * gap, 3), 255, dtype=np.uint8)
        for i, t in enumerate(tiles):
            row[:, i * (w + gap): i * (w + gap) + w] = t
        rows.append(row)
    spacer = np.full((gap, rows[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([rows[0], spacer, rows[1]])


# --- activation statistics ---------------------------------------------------------------------------------


def activations_figure(summaries: Mapping[str, pd.DataFrame], height: int | None = None) -> go.Figure:
    """Bars per layer of the mean l_inf bias of the top 5% channels (``ActivationStats.layer_summary``); with
    several models one bar per model in each group."""
    label = {"top_linf_bias": "mean l_inf bias of top 5% channels", "model": "model"}
    hover = ["channels", "max_linf_bias", "max_linf_score"]
    if len(summaries) == 1:
        fig = px.bar(next(iter(summaries.values())), x="layer", y="top_linf_bias", labels=label, hover_data=hover)
        fig.update_layout(height=height or 300, margin=dict(t=10, b=10))
        return fig
    long = pd.concat([s.assign(model=name) for name, s in summaries.items()], ignore_index=True)
    fig = px.bar(long, x="layer", y="top_linf_bias", color="model", barmode="group", labels=label, hover_data=hover)
    fig.update_layout(height=height or 340, margin=dict(t=10, b=10, l=10, r=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return fig


def norm_histogram_figure(stats: ActivationStats, layer: str, norm: str, height: int = 320) -> go.Figure:
    """Histogram over the channels of ``layer`` of each channel's mean ``norm``, clean vs. triggered."""
    j = NORMS.index(norm)
    rows = []
    for cond, d in (("clean", stats.clean), ("triggered", stats.triggered)):
        per_channel = d[layer][:, :, j].mean(0)
        rows.append(pd.DataFrame({"condition": cond, "channel": np.arange(len(per_channel)), "value": per_channel}))
    fig = px.histogram(pd.concat(rows), x="value", color="condition", barmode="overlay", nbins=40, opacity=0.6,
                       labels={"value": f"per-channel mean {NORM_LABELS[norm]}"}, color_discrete_map=CONDITION_COLORS)
    fig.update_layout(height=height, margin=dict(t=10, b=10))
    return fig


def norm_box_figure(stats: ActivationStats, norm: str, height: int = 320) -> go.Figure:
    """One box per layer and condition of the per-channel mean ``norm``, scaled by the layer's clean mean."""
    j = NORMS.index(norm)
    rows = []
    for cond, d in (("clean", stats.clean), ("triggered", stats.triggered)):
        for ly in stats.layers:
            v = d[ly][:, :, j].mean(0)
            v = v / max(float(stats.clean[ly][:, :, j].mean()), 1e-8)
            rows.append(pd.DataFrame({"layer": ly, "condition": cond, "value": v}))
    fig = px.box(pd.concat(rows), x="layer", y="value", color="condition",
                 labels={"value": f"{NORM_LABELS[norm]} / clean layer mean"}, color_discrete_map=CONDITION_COLORS)
    fig.update_layout(height=height, margin=dict(t=10, b=10))
    return fig


# --- feature space -----------------------------------------------------------------------------------------


def embedding_figure(embeddings: Mapping[str, Embedding], classes: Sequence[str], height: int | None = None,
                     lasso: bool = False, color_by: str = "kind") -> go.Figure:
    """One symbol per kind (``KIND_SYMBOLS``); coloured by kind (clean / triggered / poisoned, ``KIND_COLORS``:
    the question the view asks) or, with ``color_by="class"``, by true class (legend below the plot); one panel
    per model. Each point's ``customdata`` is its index in its model's embedding (what a lasso selection
    returns); ``lasso`` makes the lasso the drag tool."""
    if color_by not in ("kind", "class"):
        raise ValueError(f"color_by must be 'kind' or 'class', got {color_by!r}")
    frames = []
    for name, e in embeddings.items():
        frames.append(pd.DataFrame({"x": e.points[:, 0], "y": e.points[:, 1], "idx": np.arange(len(e.points)),
                                    "model": name, "kind": e.kind, "class": [classes[int(c)] for c in e.label],
                                    "prediction": [classes[int(c)] for c in e.pred]}))
    long = pd.concat(frames, ignore_index=True)
    facets = len(embeddings) > 1
    method = next(iter(embeddings.values())).method if embeddings else "PCA"
    kinds = [k for k in KIND_SYMBOLS if k in set(long["kind"])]
    fig = px.scatter(long, x="x", y="y", color=color_by, symbol="kind", symbol_map=KIND_SYMBOLS,
                     color_discrete_map=KIND_COLORS if color_by == "kind" else None, custom_data=["idx"],
                     facet_col="model" if facets else None, facet_col_spacing=0.04,
                     category_orders={"class": list(classes), "model": list(embeddings), "kind": kinds},
                     hover_data={"prediction": True, "kind": True, "class": True, "x": False, "y": False,
                                 "idx": False})
    if facets:
        fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
        fig.update_traces(marker=dict(size=5, opacity=0.8))
        fig.update_xaxes(matches=None, showticklabels=False, title_text=f"{method} 1")
        fig.update_yaxes(matches=None, showticklabels=False, title_text="")
        fig.update_yaxes(title_text=f"{method} 2", col=1)
        fig.update_layout(height=height or 460, margin=dict(t=30, b=10, l=10, r=10))
    else:
        fig.update_traces(marker=dict(size=6, opacity=0.8))
        fig.update_layout(height=height or 560, margin=dict(t=10, b=10), xaxis_title=f"{method} 1",
                          yaxis_title=f"{method} 2")
    if color_by == "kind":
        fig.update_layout(legend=dict(itemsizing="constant", title_text=""))
    else:  # classes x kinds entries: a wrapping legend under the plot, so none is cut off
        fig.update_layout(legend=dict(itemsizing="constant", title_text="", orientation="h", yanchor="top",
                                      y=-0.08, x=0, font=dict(size=10)))
    if lasso:
        fig.update_layout(dragmode="lasso")
    return fig


# --- skip ablation -----------------------------------------------------------------------------------------


def ablation_figure(results: Mapping[str, AblationResult], height: int | None = None) -> go.Figure:
    """BA and ASR as one block's skip scale γ goes from 1 to 0, one line per block, the critical block bold.

    One model: BA and ASR side by side. Several: rows BA and ASR, one column per model.
    """
    names = list(results)
    single = len(names) == 1
    if single:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("BA (clean test images)", "ASR (triggered test images)"))
        cell = {"ba": (1, 1), "asr": (1, 2)}
    else:
        fig = make_subplots(rows=2, cols=len(names), shared_xaxes=True, shared_yaxes=True, column_titles=names,
                            row_titles=["BA", "ASR"], vertical_spacing=0.06, horizontal_spacing=0.03)
    palette = px.colors.qualitative.Dark24
    for col, name in enumerate(names, start=1):
        res = results[name]
        for i, block in enumerate(dict.fromkeys(res.table.block)):
            t = res.curve(block)
            crit = block == res.critical_block
            style = dict(width=4 if crit else 1.5, dash="solid" if crit else "dot", color=palette[i % len(palette)])
            where = "" if single else f"{name}<br>"
            for metric in ("ba", "asr"):
                row, c = cell[metric] if single else (1 if metric == "ba" else 2, col)
                fig.add_trace(go.Scatter(
                    x=t.gamma, y=t[metric], mode="lines+markers", name=f"{block} (critical)" if crit and single
                    else block, legendgroup=block, line=style, marker=dict(size=(7 if crit else 4) if single
                                                                          else (6 if crit else 3)),
                    showlegend=col == 1 and metric == "ba",
                    hovertemplate=f"{where}{block}{' (critical)' if crit else ''}<br>γ %{{x}}<br>"
                                  f"{metric.upper()} %{{y:.3f}}<extra></extra>"), row=row, col=c)
    fig.update_yaxes(range=[0, 1.02])
    if single:
        fig.update_xaxes(title_text="γ (skip scale)", autorange="reversed")
        fig.update_layout(height=height or 430, margin=dict(t=40, b=10))
    else:
        fig.update_xaxes(autorange="reversed", title_text="γ (skip scale)", row=2)
        fig.update_layout(height=height or 520, margin=dict(t=40, b=10, l=10, r=10),
                          legend_title_text="block (bold: critical)")
    return fig


# --- detection (Neural Cleanse) ----------------------------------------------------------------------------


def class_labels(classes: Sequence[str]) -> list[str]:
    """``"k: name"`` per class, the labels of the detection charts."""
    return [f"{k}: {c}" for k, c in enumerate(classes)]


def _flag_colors(result: ReverseResult) -> list[str]:
    """Red: flagged; grey: converged, not flagged; light grey: did not converge (no norm, no anomaly index)."""
    converged = result.converged
    return [FLAGGED if k in result.flagged else NOT_FLAGGED if converged[k] else "#dddddd"
            for k in range(len(result.l1))]


def anomaly_figure(result: ReverseResult, classes: Sequence[str], height: int = 360,
                   reference: ReverseResult | None = None, reference_name: str = "clean reference") -> go.Figure:
    """Bars of the anomaly index per class, flagged classes red, the threshold dashed; with ``reference`` (the same
    scan of a model known to be clean) its indices as hollow bars beside them, for comparison."""
    fig = go.Figure(go.Bar(x=class_labels(classes), y=result.anomaly, marker_color=_flag_colors(result),
                           name="this model", hovertemplate="%{x}<br>anomaly index %{y:.2f}<extra></extra>"))
    if reference is not None:
        ref = np.full(len(result.anomaly), np.nan)
        n = min(len(ref), len(reference.anomaly))
        ref[:n] = np.sort(reference.anomaly[:n])[::-1]  # the reference's classes differ: compare the spread
        fig.add_trace(go.Bar(x=class_labels(classes), y=ref, name=f"{reference_name} (sorted)",
                             marker=dict(color="rgba(0,0,0,0)", line=dict(color="#1f77b4", width=2)),
                             hovertemplate="reference, rank %{x}<br>anomaly index %{y:.2f}<extra></extra>"))
        fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    fig.add_hline(y=result.threshold, line_dash="dash", annotation_text=f"threshold {result.threshold:g}")
    fig.update_layout(title="Anomaly index per class", yaxis_title="(median − L1) / (1.4826·MAD)", height=height,
                      margin=dict(t=40, b=10))
    return fig


def mask_norm_figure(result: ReverseResult, classes: Sequence[str], height: int = 360) -> go.Figure:
    """Bars of the recovered mask's L1 norm per class (hover: the recovered trigger's success on the pool)."""
    fig = go.Figure(go.Bar(x=class_labels(classes), y=result.l1, marker_color=_flag_colors(result),
                           customdata=result.success,
                           hovertemplate="%{x}<br>mask L1 %{y:.1f}<br>success, re-measured %{customdata:.2f}<extra></extra>"))
    fig.update_layout(title="Mask L1 norm per class", yaxis_title="sum of mask values (pixels)", height=height,
                      margin=dict(t=40, b=10))
    return fig


def mask_tiles(result: ReverseResult, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ``k``'s recovered mask scaled to a peak of 1, (1, H, W), and the stamp m·p, (C, H, W), in [0, 1]."""
    m = np.asarray(result.masks[k], dtype=np.float32)
    return m[None] / max(float(m.max()), 1e-6), np.asarray(result.patterns[k], dtype=np.float32) * m[None]


def _to_uint8(chw: np.ndarray, scale: int) -> np.ndarray:
    img = (np.clip(chw, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img.repeat(scale, 0).repeat(scale, 1) if scale > 1 else img


def mask_grid(result: ReverseResult, order: Sequence[int] | None = None, scale: int = 3, gap: int = 2) -> np.ndarray:
    """One uint8 image: every class's mask (:func:`mask_tiles`) on top and its stamp m·p below, classes in
    ``order`` (default: the largest anomaly index first)."""
    order = list(order) if order is not None else sorted(range(len(result.l1)), key=lambda k: -result.anomaly[k])
    rows = [[], []]
    for k in order:
        for row, tile in zip(rows, mask_tiles(result, k), strict=True):
            row.append(_to_uint8(tile, scale))
    h, w = rows[0][0].shape[:2]
    out = np.full((2 * h + gap, len(order) * w + (len(order) - 1) * gap, 3), 255, dtype=np.uint8)
    for r, tiles in enumerate(rows):
        for i, t in enumerate(tiles):
            out[r * (h + gap): r * (h + gap) + h, i * (w + gap): i * (w + gap) + w] = t
    return out


# --- input screening (analysis.screening) ------------------------------------------------------------------


def screening_histogram_figure(result: ScreenResult, height: int = 320) -> go.Figure:
    """Score histograms of clean and triggered test images (and the clean pool), with the threshold."""
    edges = np.asarray(result.hist_edges, dtype=float)
    if len(edges) < 2:
        return go.Figure()
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    groups = [("clean pool (calibration)", result.hist_pool, "#9e9e9e"),
              ("clean test images", result.hist_clean, "#1f77b4")]
    if result.hist_triggered:
        groups.append(("triggered test images", result.hist_triggered, "#d62728"))
    for name, counts, color in groups:
        total = max(1, int(sum(counts)))
        fig.add_bar(x=centres, y=[c / total for c in counts], name=name, marker_color=color, opacity=0.55)
    fig.add_vline(x=result.threshold, line_dash="dash",
                  annotation_text=f"threshold ({100 * result.fpr_target:g}% pool FPR)")
    fig.update_layout(barmode="overlay", height=height, margin=dict(t=30, b=10),
                      xaxis_title=f"{result.score_label} (higher = more likely triggered)",
                      yaxis_title="share of the group", legend=dict(orientation="h", y=1.12))
    return fig


def roc_figure(result: ScreenResult, height: int = 320) -> go.Figure:
    """ROC curve of clean vs. triggered test images, with the operating point at the threshold."""
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999"), name="chance")
    if result.roc_fpr:
        fig.add_scatter(x=result.roc_fpr, y=result.roc_tpr, mode="lines", name=f"AUROC {result.auroc:.3f}")
        fig.add_scatter(x=[result.fpr], y=[result.tpr_at_fpr], mode="markers", marker=dict(size=11, symbol="x"),
                        name=f"threshold: FPR {result.fpr:.3f}, TPR {result.tpr_at_fpr:.3f}")
    fig.update_layout(height=height, margin=dict(t=30, b=10), xaxis_title="false-positive rate (clean test images)",
                      yaxis_title="true-positive rate (triggered test images)", legend=dict(orientation="h", y=1.12))
    return fig


def mask_pattern_tile(result: ReverseResult, k: int, scale: int = 3, gap: int = 2) -> np.ndarray:
    """Class ``k``'s recovered mask, its pattern p and the stamp m·p side by side: one uint8 image, the same size
    for every class (so a grid of them lines up)."""
    mask, stamp = mask_tiles(result, k)
    pattern = np.clip(np.asarray(result.patterns[k], dtype=np.float32), 0, 1)
    tiles = [_to_uint8(t, scale) for t in (mask, pattern, stamp)]
    h, w = tiles[0].shape[:2]
    out = np.full((h, 3 * w + 2 * gap, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        out[:, i * (w + gap): i * (w + gap) + w] = t
    return out


FOOTPRINT_RGB = (230, 25, 75)  # the trigger's pixels: a strong red that no demo image (greyscale) contains
FOOTPRINT_BACKGROUND = 150  # the other pixels: mid grey, so a white or a black trigger both stand out
FRAME_RGB = (255, 255, 255)


def framed(img: np.ndarray, pad: int) -> np.ndarray:
    """``img`` (H, W, 3 uint8) inside a ``pad``-pixel white frame: a page's rounded image corners then round off
    the frame, never a corner patch of the image itself."""
    if pad <= 0:
        return img
    out = np.empty((img.shape[0] + 2 * pad, img.shape[1] + 2 * pad, 3), dtype=np.uint8)
    out[:] = FRAME_RGB
    out[pad:-pad, pad:-pad] = img
    return out


def footprint_tile(footprint: np.ndarray, image: np.ndarray | None = None, scale: int = 3, pad: int = 4
                   ) -> np.ndarray:
    """A trigger's footprint (H, W bool: the pixels it changes) drawn visibly: red on a mid-grey background, or,
    with ``image`` (C, H, W in [0, 1]), red over a dimmed greyscale copy of it; enlarged ``scale`` times and framed
    (:func:`framed`, ``pad`` image pixels) so rounded corners do not clip a corner patch."""
    fp = np.asarray(footprint, dtype=bool)
    if image is None:
        base = np.full((*fp.shape, 3), FOOTPRINT_BACKGROUND, dtype=np.uint8)
    else:
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 1).mean(0)
        base = np.repeat((60 + 150 * grey).round().astype(np.uint8)[..., None], 3, axis=2)
    base[fp] = FOOTPRINT_RGB
    if scale > 1:
        base = base.repeat(scale, 0).repeat(scale, 1)
    return framed(base, pad * scale)


# --- defense runs: curves and live progress ------------------------------------------------------------


def scale_groups(df: pd.DataFrame, cols: list[str]) -> list[list[str]]:
    """Columns grouped by order of magnitude (e.g. a 255-sized L1 norm apart from 0.3-sized losses), so each
    group gets its own y axis."""
    groups: dict[int, list[str]] = {}
    for col in cols:
        peak = float(pd.to_numeric(df[col], errors="coerce").abs().max() or 0.0)
        mag = 0 if not math.isfinite(peak) or peak <= 1.5 else int(math.floor(math.log10(peak)))
        groups.setdefault(mag, []).append(col)
    return [groups[k] for k in sorted(groups)]


def lines_figure(df: pd.DataFrame, x: str, cols: list[str], title: str | None, x_title: str,
                 height_per_panel: int = 170) -> go.Figure:
    """One panel (with its own y axis) per group of columns of similar size, sharing the x axis."""
    groups = scale_groups(df, cols)
    fig = make_subplots(rows=len(groups), cols=1, shared_xaxes=True, vertical_spacing=0.08)
    palette = px.colors.qualitative.Plotly
    for row, group in enumerate(groups, start=1):
        for col in group:
            fig.add_trace(go.Scatter(x=df[x], y=df[col], name=col, mode="lines+markers",
                                     line=dict(color=palette[cols.index(col) % len(palette)])), row=row, col=1)
        fig.update_yaxes(title_text=", ".join(group) if len(group) <= 2 else "", row=row, col=1)
    fig.update_xaxes(title_text=x_title, row=len(groups), col=1)
    fig.update_layout(height=60 + height_per_panel * len(groups), title=title, margin=dict(t=40 if title else 10, b=10))
    return fig


_STEP = re.compile(r"([A-Za-z][A-Za-z ]*?)\s+(\d+)\s*/\s*(\d+)")


def progress_axis(events: list[dict]) -> tuple[list, str]:
    """The x values of a run's progress chart: the epoch / iteration / step its messages count ("epoch 3/10"),
    when they all count the same thing, else the seconds since the first event."""
    found = [_STEP.search(str(e.get("message", ""))) for e in events]
    units = {m.group(1).split(":")[-1].strip() for m in found if m}
    if found and all(found) and len(units) == 1:
        return [int(m.group(2)) for m in found], units.pop()
    t0 = events[0]["t"] if events else 0.0
    return [round(float(e["t"]) - t0, 1) for e in events], "seconds since start"
