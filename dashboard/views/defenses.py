"""Defenses page: one card per registered defense, run in the background with live progress."""

from __future__ import annotations

import time

import pandas as pd
import plotly.express as px
import streamlit as st

from analysis.figures import lines_figure, progress_axis
from dashboard.common import load_suspect, memoized, model_line, sidebar, store, trigger_notice
from dashboard.stress import stress_panel
from defenses.base import ParamError, param_specs
from defenses.registry import all_defenses, get_defense, list_defenses
from defenses.runner import HELD_OUT_FRACTION, resolve_pool_size
from runs.compare import format_groups, group_runs, runs_table
from runs.identity import runs_of
from runs.jobs import ensure_worker, reap_workers, submit
from runs.store import RunRecord
from runs.timing import eta_text, expected_time
from suspects.identity import ref_fingerprint
from suspects.metrics import metric_definitions
from suspects.plugins import refused

ref = sidebar()
suspect, model_lock = load_suspect(ref)
model_key = ref_fingerprint(ref)  # one history per model: its runs under any name (runs.identity)
runs = store()
reap_workers()  # a worker this server started and that has exited is waited for: no zombies (issue 12.9)

st.title("Defenses")
model_line(ref)
trigger_notice(suspect)
st.markdown(
    "Each card runs one defense on the selected suspect **in a background worker** (one at a time per device; "
    "further runs queue). Progress is stored durably, so you can switch pages, reload or open another tab; the "
    "repaired model lands in the run store and in the suspect picker. A defense sees only the suspect's clean "
    "*defense pool*, never the test split; BA / ASR / RA before and after are measured on the test split for "
    "this report only."
)
pool_n = len(suspect.defense_pool)
pool_size = st.slider("Clean pool images given to the defense", 10, pool_n, resolve_pool_size(None, pool_n), step=10,
                      key="pool_size",
                      help="drawn from the suspect's defense pool (clean training images, never poisoned); "
                           f"{HELD_OUT_FRACTION:.0%} of them are held out for the defenses' stopping and selection rules")


# live runs measure "after" on a random subset of the test split (with 95% intervals); the CLI and the benchmarks
# measure on all of it (issue 17.4)
LIVE_MEASURE = "subset:2000"


def _expected(defense_name: str, preset: str, overrides: dict) -> str:
    """The card's expected-time line: measured from finished runs in the store, else estimated (cached)."""
    n_done = len(runs_of(runs, ref, key=model_key, defense=defense_name))
    key = (ref, defense_name, preset, tuple(sorted((k, str(v)) for k, v in overrides.items())), pool_size, n_done)

    def compute() -> str:
        try:
            with model_lock:
                exp = expected_time(runs, defense_name, preset, overrides, suspect, ref, pool_size,
                                    measure=LIVE_MEASURE)
        except (ParamError, ValueError) as err:
            return f"expected time: unknown ({err})"
        return exp.text()

    return memoized("expected_time", key, compute, max_entries=64)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _widget(defense_name: str, preset: str, spec: dict, value):
    key = f"p_{defense_name}_{preset}_{spec['name']}"
    label, help_ = spec["name"], spec["help"]
    if spec.get("choices"):
        options = list(spec["choices"])
        return st.selectbox(label, options, index=options.index(value), key=key, help=help_)
    if isinstance(spec["default"], bool):
        return st.checkbox(label, value=bool(value), key=key, help=help_)
    if isinstance(spec["default"], int):
        return st.number_input(label, value=int(value), step=1, key=key, help=help_)
    if isinstance(spec["default"], float):
        return st.number_input(label, value=float(value), format="%g", key=key, help=help_)
    return st.text_input(label, value=str(value), key=key, help=help_)


def _rounded(x):
    """``x`` with floats cut to 4 significant digits, also inside lists and dicts (artifact tables)."""
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _rounded(y) for k, y in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(y) for y in x]
    return x


def _render_finished(rec: RunRecord) -> None:
    report = runs.report(rec.id)
    if report is None:
        st.error("The run's folder is missing or incomplete on disk.")
        return
    definitions = metric_definitions(suspect.trigger)
    c = st.columns(5)
    c[0].metric("BA", _fmt(report["ba"]), delta=f"{100 * (report['ba'] - report['ba_before']):+.1f} pts",
                help=definitions["ba"])
    if report.get("asr") is not None:
        c[1].metric("ASR", _fmt(report["asr"]), delta=f"{100 * (report['asr'] - report['asr_before']):+.1f} pts",
                    delta_color="inverse", help=definitions["asr"])
        c[2].metric("RA", _fmt(report["ra"]), delta=f"{100 * (report['ra'] - report['ra_before']):+.1f} pts",
                    help=definitions["ra"])
        c[3].metric("DER", f"{report['der']:.3f}", help=definitions["der"])
    c[4].metric("Time", f"{report['seconds']:.0f} s", help=f"device: {report['device']}")
    st.caption(f"Before: BA {_fmt(report['ba_before'])}, ASR {_fmt(report['asr_before'])}, "
               f"RA {_fmt(report['ra_before'])}"
               f"{' (from the card)' if report.get('before_source') == 'card' else ''} · after: measured on "
               f"{report.get('measured_on', 'the whole test split')}"
               + "".join(f", {k.upper()} 95% CI {_fmt(v[0])}-{_fmt(v[1])}"
                         for k, v in (report.get('ci95') or {}).items() if v)
               + f" · preset {report['preset']} · pool {report['pool_size']} images · run {rec.id}")
    if (report.get("artifacts") or {}).get("failed"):
        st.warning(f"The defense failed: {report['artifacts'].get('reason', 'no reason given')}")
    arts = {k: v for k, v in report.get("artifacts", {}).items() if v is not None}
    histograms = {k: arts.pop(k) for k in list(arts) if isinstance(arts[k], dict) and "series" in arts[k]}
    if arts:
        short = {k: v for k, v in arts.items() if not isinstance(v, (list, dict)) or len(str(v)) < 120}
        st.dataframe(pd.DataFrame({"artifact": list(short), "value": [str(_rounded(v)) for v in short.values()]}),
                     hide_index=True)
        long = {k: v for k, v in arts.items() if k not in short}
        if long:
            with st.expander("More artifacts"):
                st.json(_rounded(long))
    titles = get_defense(report["defense"]).curve_labels if report.get("defense") in list_defenses() else {}
    for name, rows in (report.get("curves") or {}).items():
        if rows and isinstance(rows[0], dict):
            df = pd.DataFrame(rows)
            x = df.columns[0]
            ys = [col for col in df.columns[1:] if pd.api.types.is_numeric_dtype(df[col])]
            if ys:
                fig = lines_figure(df, x, ys, titles.get(name, name.replace("_", " ")), x.replace("_", " "))
                st.plotly_chart(fig, key=f"curve_{rec.id}_{name}")
    for name, hist in histograms.items():
        _poisoned_vs_clean(rec.id, name, hist)
    stress_panel(runs, rec.id, rec.run_dir, key="def_")
    if st.button("Open the repaired model in the analysis pages", key=f"open_{rec.id}", icon=":material/search:"):
        st.session_state["suspect"] = rec.run_dir
        st.switch_page("views/overview.py")


def _poisoned_vs_clean(run_id: str, name: str, hist: dict) -> None:
    """A per-epoch histogram of poisoned vs. clean training samples (DBD's split losses, CBD's weights)."""
    series = [s for s in hist.get("series", []) if s.get("edges")]
    if not series:
        return
    epochs = [s["epoch"] for s in series]
    epoch = (st.select_slider("Epoch", epochs, value=epochs[-1], key=f"hist_{run_id}_{name}")
             if len(epochs) > 1 else epochs[0])
    s = series[epochs.index(epoch)]
    edges = s["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    df = pd.DataFrame({"bin": centres * 2, "share": s["clean"] + s["poisoned"],
                       "samples": ["clean"] * len(centres) + ["poisoned"] * len(centres)})
    fig = px.bar(df, x="bin", y="share", color="samples", barmode="overlay", opacity=0.6, height=260,
                 title=f"{hist.get('x_label', name)}: poisoned vs. clean training samples (epoch {epoch})",
                 labels={"bin": hist.get("x_label", name), "share": "share of the group"})
    if s.get("cut") is not None:
        fig.add_vline(x=s["cut"], line_dash="dash", annotation_text=hist.get("cut_label", "cut"))
    fig.update_layout(margin=dict(t=40, b=10))
    st.plotly_chart(fig, key=f"histplot_{run_id}_{name}")
    st.caption("Poisoned vs. clean uses the suspect's known poisoned indices, for display only: the defense "
               "never sees them.")


def _live_chart(rec: RunRecord) -> None:
    events = runs.events(rec.id)
    cols = [k for k in ("held_out_ba", "held_out_asr", "knn_ba", "knn_asr") if any(k in e for e in events)]
    if not cols:
        cols = [k for k in ("loss", "loss_clean", "loss_perturbed", "loss_triggered") if any(k in e for e in events)]
    if events and cols:
        events = [e for e in events if any(e.get(c) is not None for c in cols)]
        xs, x_title = progress_axis(events)
        df = pd.DataFrame(events)[cols].assign(_x=xs)
        fig = lines_figure(df, "_x", cols, None, x_title, height_per_panel=150)
        st.plotly_chart(fig, key=f"live_{rec.id}_{len(events)}")
        if "held_out_ba" in cols or "knn_ba" in cols:
            st.caption("Live: BA and ASR on the held-out part of the defense pool (not the test split); knn_* "
                       "classify the current features by their nearest pool images (stages without a head).")


def _render_spread(rec: RunRecord) -> None:
    """Mean ± sd over the finished runs with the same (defense, preset, overrides) as ``rec``, when there are several."""
    table = runs_table(runs, ref)
    mine = table[table["run_id"] == rec.id]
    if mine.empty:
        return
    same = table[(table["defense"] == rec.defense) & (table["preset"] == mine.iloc[0]["preset"])
                 & (table["overrides"] == mine.iloc[0]["overrides"])]
    if len(same) > 1:
        st.markdown(f"**Over {len(same)} seeds** (mean ± sample sd):")
        st.code(format_groups(group_runs(same)), language=None)


@st.fragment(run_every=1.0)
def live_panel(defense_name: str) -> None:
    latest = runs_of(runs, ref, key=model_key, status=None, defense=defense_name)
    rec = latest[0] if latest else None
    if rec is None or not rec.active:
        st.rerun()  # the run ended: redraw the whole page once with its results
        return
    if rec.status == "queued":
        if not runs.list(status="running"):
            ensure_worker(runs)
        st.info(f"Queued (run {rec.id}); waiting for the device.")
    else:
        fraction = min(max(rec.progress, 0.0), 1.0)
        elapsed = time.time() - (rec.started or rec.created)
        st.progress(fraction, text=f"{rec.message} ({100 * fraction:.0f}%) · {eta_text(fraction, elapsed)}")
        _live_chart(rec)
    if st.button("Cancel", key=f"cancel_{rec.id}", icon=":material/stop:"):
        runs.request_cancel(rec.id)
        time.sleep(0.2)


cards = all_defenses()  # the registry, installed plugins included (docs/plugins.md)
for bad in refused("defenses"):  # a broken plugin is named once here and never breaks the page
    st.warning(f"Defense plugin **{bad.name}** (`{bad.value}`, from {bad.dist}) was not loaded: {bad.reason}. "
               "`backdoor-lens plugins` lists every plugin.", icon=":material/extension_off:")
for defense in cards:
    with st.container(border=True):
        st.subheader(defense.title)
        st.markdown(f"{defense.summary}  \n*{defense.paper}* · threat model: {defense.threat.describe()}")
        latest = runs_of(runs, ref, key=model_key, status=None, defense=defense.name)  # this model, any name
        rec = latest[0] if latest else None
        busy = rec is not None and rec.active
        with st.expander("Parameters", expanded=False):
            preset = st.radio("Preset", list(defense.presets), horizontal=True, key=f"preset_{defense.name}",
                              help="quick: a live demo on a CPU; paper: the official settings")
            resolved = defense.make_params(preset)
            specs = param_specs(defense.Params)
            cols = st.columns(3)
            values = {}
            for i, spec in enumerate(specs):
                with cols[i % 3]:
                    values[spec["name"]] = _widget(defense.name, preset, spec, getattr(resolved, spec["name"]))
            seeds = st.number_input("Seeds", 1, 20, 1, key=f"seeds_{defense.name}",
                                    help="run the defense with seeds 0..N-1 (one queued run each) and show mean ± "
                                         "sd of BA / ASR / RA / DER")
        overrides = {k: v for k, v in values.items() if v != getattr(resolved, k)}
        try:  # what the chosen settings need (shortcut suppression's block='auto' needs a trigger)
            defense.check_applicable(suspect, defense.make_params(preset, overrides))
            applicable, reason = True, ""
        except ValueError as err:  # ParamError included: the widgets keep values in range
            applicable, reason = False, str(err)
        if applicable and not busy:
            st.caption(f":material/schedule: {_expected(defense.name, preset, overrides)}; \"after\" is measured "
                       f"on {LIVE_MEASURE.split(':')[1]} random test images, with 95% intervals")
        if not applicable:
            st.warning(reason)
        if st.button(f"Run {defense.title}", key=f"run_{defense.name}", disabled=busy or not applicable,
                     type="primary", icon=":material/play_arrow:"):
            try:
                run_id = submit(runs, defense.name, ref, preset, overrides, pool_size=pool_size,
                                measure=LIVE_MEASURE)
                for seed in range(1, int(seeds)):  # the other seeds queue behind seed 0, one run each
                    submit(runs, defense.name, ref, preset, overrides, pool_size=pool_size, seed=seed,
                           measure=LIVE_MEASURE)
                st.session_state.setdefault("jobs", {})[defense.name] = run_id
                st.query_params["job"] = run_id
                st.rerun()
            except (ParamError, ValueError) as err:
                st.error(str(err))
        if busy:
            live_panel(defense.name)
        elif rec is not None:
            if rec.status == "finished":
                _render_finished(rec)
                _render_spread(rec)
            elif rec.status == "interrupted":
                st.warning(f"The last run ({rec.id}) was interrupted: {rec.error}")
            elif rec.status == "cancelled":
                st.info(f"The last run ({rec.id}) was cancelled.")
            elif rec.status == "failed":
                st.error(f"The last run ({rec.id}) failed.")
                with st.expander("Error"):
                    st.code(rec.error or "")
