"""Exports of a suspect's comparison: one self-contained HTML report, and the charts as PNG.

The HTML report holds the suspect's card, the run table with every column's definition, the BA-vs-ASR chart
with its Pareto front, the bars per metric, and the side-by-side analyses (Grad-CAM overlays, activation
statistics, the feature-space embedding, skip-ablation curves) of the suspect and its best run (highest DER)
or the runs asked for, drawn by the same figure functions (:mod:`analysis.figures`) as the dashboard's pages. plotly.js is inlined once and images are base64 PNGs: the file opens offline.

PNG charts are rendered by kaleido in a headless Chrome / Chromium (found on PATH, or named by
``BROWSER_PATH``) with MathJax off, so nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

import suspects
from analysis.figures import ablation_figure, activations_figure, embedding_figure, gradcam_grid
from suspects.atomic import write_text
from suspects.metrics import metric_definitions
from suspects.store import Suspect

from .compare import (
    COLUMN_DEFINITIONS,
    GROUP_DISPLAY,
    GROUP_KEYS,
    MADE_THIS,
    METRIC_LABELS,
    PARTS,
    SideBySide,
    best_run,
    column_definitions,
    group_runs,
    groups_display,
    metric_bars_figure,
    run_label,
    runs_table,
    side_by_side,
    tradeoff_figure,
)
from .identity import family, made_by_text, resolve_ref, short_ref
from .store import RunStore
from .stress import load_stress

__all__ = ["png_bytes", "figures_png", "figures_zip", "run_figures", "pick_runs", "html_report", "write_report"]

Progress = Callable[[float, str, dict], None]


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W[, 3]) array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def figures_png(figures: dict[str, go.Figure], width: int = 1100, scale: float = 2.0) -> dict[str, bytes]:
    """Render plotly figures to PNG (name -> bytes) in one headless-browser session (kaleido).

    Each figure keeps its own layout height (500 px if unset). Raises RuntimeError when kaleido or a
    Chrome / Chromium is missing.
    """
    try:
        import kaleido
        from kaleido.errors import ChromeNotFoundError
    except ImportError as err:
        raise RuntimeError("PNG export needs the kaleido package (pip install kaleido)") from err
    if not figures:
        return {}
    with tempfile.TemporaryDirectory(prefix="backdoor-lens-png-") as tmp:
        paths = {name: Path(tmp) / f"{i}.png" for i, name in enumerate(figures)}
        specs = [{"fig": fig.to_dict(), "path": paths[name],
                  "opts": {"format": "png", "width": width, "height": fig.layout.height or 500, "scale": scale}}
                 for name, fig in figures.items()]
        try:
            kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False})
        except ChromeNotFoundError as err:
            raise RuntimeError("PNG export needs Chrome or Chromium: install it (Debian: apt-get install chromium) "
                               "or name its binary in BROWSER_PATH") from err
        missing = [name for name, p in paths.items() if not p.is_file()]
        if missing:
            raise RuntimeError(f"kaleido wrote no PNG for {missing}")
        return {name: p.read_bytes() for name, p in paths.items()}


def figures_zip(figures: dict[str, go.Figure], width: int = 1100, scale: float = 2.0) -> bytes:
    """The figures as ``<name>.png`` files in one zip archive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in figures_png(figures, width, scale).items():
            zf.writestr(f"{name}.png", data)
    return buf.getvalue()


def run_figures(table: pd.DataFrame) -> dict[str, go.Figure]:
    """The run charts by file name: ``ba_vs_asr`` and ``metrics``."""
    return {"ba_vs_asr": tradeoff_figure(table), "metrics": metric_bars_figure(table)}


def pick_runs(table: pd.DataFrame, runs: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows of ``table`` named by run id, id suffix or folder; without names, the best run (highest DER)."""
    if not runs:
        best = best_run(table)
        return table.iloc[0:0] if best is None else table.loc[[best.name]]
    picked = []
    for ref in runs:
        hit = table[(table.run_id == ref) | table.run_id.str.endswith(f"-{ref}") | (table.run_dir == ref)]
        if ref and hit.empty:
            hit = table[[bool(d) and Path(d).resolve() == Path(ref).expanduser().resolve() for d in table.run_dir]]
        if len(hit) != 1:
            raise ValueError(f"{ref!r} names {len(hit)} stored runs of this suspect; use a run id from "
                             "`backdoor-lens compare`")
        picked.append(hit.index[0])
    return table.loc[list(dict.fromkeys(picked))]


# --- HTML ----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0;display:block;max-width:100%;overflow-x:auto}th,td{border:1px solid #ddd;padding:.25rem .5rem}
th{background:#f4f4f4;cursor:help;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.pareto td{background:#eef7ee}tr.made td{background:#fff3c4;font-weight:600}.muted{color:#666;font-size:.9rem}dl{font-size:.9rem}dt{font-weight:600}
dd{margin:0 0 .4rem 1.2rem}.side{display:flex;gap:1.5rem;flex-wrap:wrap}.side>div{flex:1;min-width:300px}
img.grid{image-rendering:pixelated;width:100%;border:1px solid #ddd}.note{background:#fff8e1;padding:.5rem}
"""


def _e(v: object) -> str:
    return html.escape(str(v))


def _fmt(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def _img(image: np.ndarray, alt: str) -> str:
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    return f'<img class="grid" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _fig(fig: go.Figure) -> str:
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _table_html(table: pd.DataFrame, highlight: str | None = None, defs: dict[str, str] | None = None) -> str:
    """The run table; ``highlight``: a run id whose row is marked (the run that made the model under analysis);
    ``defs``: the column definitions shown on hover (:func:`runs.compare.column_definitions`)."""
    defs = COLUMN_DEFINITIONS if defs is None else defs
    cols = [c for c in table.columns if c != "run_dir"]
    head = "".join(f'<th title="{_e(defs.get(c, ""))}">{_e(c)}</th>' for c in cols)
    rows = []
    for _, r in table.iterrows():
        cells = "".join(
            f'<td class="num">{_e(_fmt(r[c], 1 if c == "seconds" else 3))}</td>' if isinstance(r[c], (float, int))
            and not isinstance(r[c], bool) else f"<td>{_e(_fmt(r[c]))}</td>" for c in cols)
        cls = " ".join(c for c, on in (("pareto", r["pareto"]), ("made", r["run_id"] == highlight)) if on)
        title = f' title="{_e(MADE_THIS)}"' if r["run_id"] == highlight else ""
        rows.append(f'<tr class="{cls}"{title}>{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _groups_html(table: pd.DataFrame) -> str:
    """The runs grouped by (defense, preset, overrides) with the statistics of :mod:`runs.stats` (mean ± sd, median
    and range, bootstrap interval, k/n, split, near the front), when some setting has several seeds; each column
    carries its definition (hover, and listed below the table)."""
    groups = group_runs(table)
    if not (groups["n_seeds"] > 1).any():
        return ""
    show = groups_display(groups)
    head = "".join(f'<th title="{_e(GROUP_DISPLAY.get(c, ""))}">{_e(c)}</th>' for c in show.columns)
    rows = "".join(
        "<tr>" + "".join(f'<td class="num">{_e(v)}</td>' if c not in GROUP_KEYS else f"<td>{_e(v)}</td>"
                         for c, v in r.items()) + "</tr>" for _, r in show.iterrows())
    defs = "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in GROUP_DISPLAY.items()) + "</dl>"
    return ('<h3>Grouped by (defense, preset, overrides)</h3><p class="muted">Each setting\'s runs: mean ± sample sd, '
            "median and range, the bootstrap 95% interval of the mean (n >= 5), successes (k/n) and whether the runs "
            f"split.</p><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{defs}")


def _definitions_html(keys: Sequence[str], defs: dict[str, str] | None = None) -> str:
    defs = COLUMN_DEFINITIONS if defs is None else defs
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(defs[k])}</dd>" for k in keys) + "</dl>"


def _card_html(suspect: Suspect, ref: str) -> str:
    card = suspect.card
    trig = card.get("trigger")
    trig_txt = "none known" if not trig else f"{trig.get('name')} (target {trig.get('target')}, " \
        f"{trig.get('mapping', 'all-to-one')}, params {trig.get('params', {})})"
    m = card.get("metrics") or {}
    items = [("reference", ref), ("architecture", f"{card.get('arch')} {card.get('arch_kwargs', {})}"),
             ("classes", f"{len(suspect.classes)}: {', '.join(suspect.classes)}"),
             ("input", " x ".join(str(d) for d in suspect.input_shape)), ("data", card.get("data")),
             ("trigger", trig_txt),
             ("measured", ", ".join(f"{k.upper()} {_fmt(m.get(k))}" for k in ("ba", "asr", "ra")) or "n/a")]
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


def _metrics_line(s: Suspect) -> str:
    m = s.card.get("metrics") or {}
    return " · ".join(f"{k.upper()} {_fmt(m.get(k))}" for k in ("ba", "asr", "ra"))


def _side_by_side_html(sbs: SideBySide, models: dict[str, Suspect], classes: Sequence[str]) -> str:
    out = ['<div class="side">' + "".join(
        f"<div><h3>{_e(label)}</h3><p>{_e(_metrics_line(models[label]))}</p></div>" for label in sbs.labels)
        + "</div>"]
    out.append("<h3>Grad-CAM overlays</h3>")
    if sbs.gradcam:
        out.append(f'<p class="muted">GradCAM at layer {_e(sbs.layer)} for the predicted class, on the same '
                   "images: clean on top, triggered copies below. The trigger-attention share is the fraction of a "
                   "map's mass on the pixels the trigger changes.</p><div class=\"side\">")
        for label, res in sbs.gradcam.items():
            out.append(f"<div><b>{_e(label)}</b><br>{_img(gradcam_grid(sbs.sample, res), label)}"
                       f"<p>trigger-attention share: clean {100 * res.mean_clean_share:.1f}%, triggered "
                       f"{100 * res.mean_triggered_share:.1f}% (chance {100 * res.footprint_fraction:.1f}%)</p></div>")
        out.append("</div>")
    else:
        out.append(f'<p class="note">{_e(sbs.notes.get("gradcam", "not computed"))}</p>')
    out.append("<h3>Activation statistics</h3>")
    if sbs.activations:
        out.append('<p class="muted">Per layer, the mean l_inf bias of its top 5% channels: log(l_inf growth) − '
                   "log(l1 growth) under the trigger (0 = both grow alike). A large bias in deep layers points at "
                   "channels the backdoor has taken over.</p>" + _fig(activations_figure(sbs.activations)))
    else:
        out.append(f'<p class="note">{_e(sbs.notes.get("activations", "not computed"))}</p>')
    out.append("<h3>Feature space</h3>")
    if sbs.features:
        seps = "; ".join(f"{_e(k)}: {_fmt(e.separation['score'], 2)} (chance {_fmt(e.separation['chance'], 2)})"
                         for k, e in sbs.features.items())
        out.append('<p class="muted">Penultimate features of clean (circles) and triggered (x) test images, '
                   "PCA per model. Poisoned-cluster separation in the full feature space (mean share of a "
                   f"triggered point's nearest neighbours that are triggered): {seps}.</p>"
                   + _fig(embedding_figure(sbs.features, classes)))
    else:
        out.append(f'<p class="note">{_e(sbs.notes.get("features", "not computed"))}</p>')
    out.append("<h3>Skip-connection ablation</h3>")
    if sbs.ablation:
        crit = "; ".join(f"{_e(k)}: {_e(r.critical_block or 'none')}" for k, r in sbs.ablation.items())
        out.append('<p class="muted">BA and ASR as one residual block\'s skip output is scaled by γ from 1 to 0; '
                   "the critical block (largest rise of ASR between neighbouring γ, discounted by exp(ASR)) is bold: "
                   f"{crit}.</p>" + _fig(ablation_figure(sbs.ablation)))
    else:
        out.append(f'<p class="note">{_e(sbs.notes.get("ablation", "not computed"))}</p>')
    return "\n".join(out)


def _stress_html(table: pd.DataFrame) -> str:
    """The stress-test results stored with the listed runs (``stress.json``), or '' when none has one."""
    rows = []
    for _, r in table.iterrows():
        res = load_stress(r["run_dir"])
        if not res:
            continue
        cells = [run_label(r), res.get("verdict"), res.get("asr"), res.get("ba"), res.get("asr_after_retune"),
                 res.get("ba_after_retune"), res.get("reference") or "none known",
                 res.get("reference_asr_after_retune"), res.get("seconds")]
        rows.append("<tr>" + "".join(
            f'<td class="num">{_e(_fmt(c, 1 if i == 8 else 3))}</td>' if isinstance(c, (float, int))
            else f"<td>{_e(_fmt(c))}</td>" for i, c in enumerate(cells)) + "</tr>")
    if not rows:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("run", "verdict", "ASR", "BA", "ASR after re-tuning",
                                            "BA after re-tuning", "clean reference", "reference ASR after",
                                            "seconds"))
    return ("<h2>Stress test (retuning attack)</h2>"
            '<p class="muted">Min et al., NeurIPS 2024: each model is fine-tuned for a few epochs on clean '
            "defense-pool images with a few poisoned ones mixed in, and so is the clean model of the same family. "
            "<b>not repaired</b>: the ASR was never brought down; <b>superficial</b>: the backdoor comes back; "
            "<b>robust</b>: the ASR after re-tuning stays near the clean reference's; <b>inconclusive</b>: BA "
            "collapsed or too few images. ASR after re-tuning is the mean over the seeds. Test images are only "
            "measured.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def html_report(suspect_ref: str, store: RunStore | None = None, runs: Sequence[str] | None = None,
                n: int = 200, cam_images: int = 8, parts: Sequence[str] = PARTS,
                progress: Progress | None = None) -> str:
    """The self-contained HTML report of ``suspect_ref``: its stored runs and the side-by-side analyses of the
    suspect and ``runs`` (ids; default: the best run by DER) on ``n`` images (``cam_images`` for Grad-CAM)."""
    report = progress or (lambda f, m, d: None)
    store = store or RunStore()
    report(0.0, "reading the run store", {})
    suspect_ref = resolve_ref(suspect_ref, store)
    here = suspects.load(suspect_ref)
    fam = family(store, here, suspect_ref)
    own = runs_table(store, records=fam.children)
    if fam.repaired and fam.parent_ref is not None:  # a repaired model: its parent's runs, the one that made it marked
        base = suspects.load(fam.parent_ref)
        table = runs_table(store, records=fam.siblings)
        chosen = pick_runs(table, runs or [fam.made_by.id])
    else:
        base, table = here, own
        chosen = pick_runs(table, runs)
    base.model.eval()
    models: dict[str, Suspect] = {f"suspect ({base.name})": base}
    for _, row in chosen.iterrows():
        models[run_label(row)] = suspects.load(row["run_dir"])

    def scaled(f: float, m: str, d: dict) -> None:
        report(0.05 + 0.9 * f, m, d)

    sbs = side_by_side(models, base, n=n, cam_images=cam_images, parts=parts, progress=scaled)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    title = f"Backdoor Lens report: {here.name}"
    name = short_ref(suspect_ref, store, here)
    made = fam.made_by.id if base is not here and fam.made_by is not None else None
    defs, col_defs = metric_definitions(here.trigger), column_definitions(here.trigger)  # ASR / RA per its mapping
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="muted">Generated {_e(now)} by backdoor-lens {_e(suspects.__version__)} from the run store '
            f"{_e(store.root)}.</p>", "<h2>Suspect</h2>", _card_html(here, name)]
    if made is not None:
        body.append(f'<p class="note">This is the repaired model of {_e(made_by_text(fam, store))}. The stored runs '
                    "below are its parent's (its siblings; the highlighted row is the run that made it), and the "
                    "side by side compares the parent with it.</p>")
    body += [
            "<h2>Metrics</h2><dl>" + "".join(f"<dt>{_e(METRIC_LABELS[k])}</dt><dd>{_e(defs[k])}</dd>"
                                             for k in ("ba", "asr", "ra", "der")) + "</dl>",
            f"<h2>{'Runs of its parent' if made else 'Stored runs'} ({len(table)})</h2>"]
    if table.empty:
        body.append('<p class="note">No finished run of this suspect is stored yet '
                    "(`backdoor-lens defend DEFENSE SUSPECT` or the Defenses page adds one).</p>")
    else:
        body += ['<p class="muted">Every finished defense run of this suspect, newest first; green rows are on the '
                 "Pareto front. Hover a column name for its definition.</p>", _table_html(table, made, col_defs),
                 "<details><summary>Column definitions</summary>"
                 + _definitions_html([c for c in table.columns if c in col_defs], col_defs) + "</details>",
                 _groups_html(table),
                 _fig(tradeoff_figure(table)),
                 '<p class="muted">Top left is best. The dashed step line is the Pareto front; the star is the '
                 "suspect before any defense.</p>", _fig(metric_bars_figure(table)),
                 '<p class="muted">Dashed red line: the suspect before the defense.</p>', _stress_html(table)]
    if made is not None:
        body.append(f"<h2>Runs on this repaired model ({len(own)})</h2>")
        body.append(_table_html(own, defs=col_defs) if not own.empty else '<p class="note">None yet (`backdoor-lens defend DEFENSE '
                    f"{_e(name)}` adds one).</p>")
    against = ", ".join(list(models)[1:]) or "no run"
    body += [f"<h2>Before / after: the suspect vs. {_e(against)}</h2>",
             f'<p class="muted">The same {n} test images (and {cam_images} for Grad-CAM) and the suspect\'s trigger '
             "for every model.</p>", _side_by_side_html(sbs, models, base.classes)]
    report(1.0, "report written", {})
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style><script type=\"text/javascript\">{get_plotlyjs()}</script></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(path: str | os.PathLike, suspect_ref: str, **kwargs) -> Path:
    """Write :func:`html_report` to ``path`` atomically (a temporary file renamed at the end)."""
    return write_text(Path(path), html_report(suspect_ref, **kwargs))
