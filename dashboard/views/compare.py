"""Compare page: every stored run of the selected suspect (table, BA vs. ASR with its Pareto front, bars per
metric, filters, exports), and any two of its models side by side."""

from __future__ import annotations

import streamlit as st

from analysis.activations import activation_summary
from analysis.features import embed_features
from analysis.figures import ablation_figure, activations_figure, embedding_figure, gradcam_grid
from analysis.gradcam import compare_gradcam, default_target_layer
from analysis.samples import paired_sample
from analysis.shortcuts import ablation_curves
from dashboard.common import label_of, load_suspect, model_line, sample_size, sidebar, store, trigger_notice
from dashboard.signs import delta_color, delta_points
from dashboard.stress import EXPLAIN as STRESS_EXPLAIN
from dashboard.stress import stress_panel
from runs.compare import (
    GROUP_DISPLAY,
    MADE_THIS,
    METRIC_LABELS,
    PART_TITLES,
    backdoorbench_csv,
    best_run,
    column_definitions,
    filter_runs,
    group_runs,
    groups_display,
    metric_bars_figure,
    run_label,
    runs_table,
    table_csv,
    table_json,
    tradeoff_figure,
    with_model,
)
from runs.identity import family, made_by_text, short_ref
from runs.published import published_records
from runs.report import figures_zip, html_report, run_figures
from runs.sweep import SweepSpec, cancel_sweep, list_sweeps, parse_sets, submit_sweep
from suspects.identity import ref_fingerprint
from suspects.metrics import metric_definitions
from suspects.models import list_residual_blocks

ref = sidebar()
suspect, lock = load_suspect(ref)
definitions, col_defs = metric_definitions(suspect.trigger), column_definitions(suspect.trigger)  # per mapping
runs = store()

st.title("Compare defense runs")
model_line(ref)
trigger_notice(suspect)
st.markdown(
    f"Every finished defense run of **{suspect.name}** in the run store: BA and ASR after the defense, measured on "
    "the test split the defense never saw. A run is on the **Pareto front** when no other run has a BA at least as "
    "high and an ASR at least as low. Below, any two models of this suspect (the suspect itself and its repaired "
    "models) side by side on the same images, with the suspect's trigger."
)

# --- sweeps -------------------------------------------------------------------------------------------


@st.fragment(run_every=2.0)
def sweeps_panel() -> None:
    """The sweeps of this suspect with their progress (refreshed while one runs)."""
    sweeps = list_sweeps(runs, ref)
    if not sweeps:
        return
    st.subheader(f"Sweeps ({len(sweeps)})")
    for sw in sweeps[:10]:
        spec = sw.spec
        c1, c2 = st.columns([5, 1])
        c1.progress(sw.progress, text=f"`{sw.id}` {sw.status}: {sw.done} ran, {sw.skipped} done before, "
                                      f"{sw.failed} failed of {sw.total} — {', '.join(spec['defenses'])} x "
                                      f"{', '.join(spec['presets'])} x seeds {spec['seeds']}")
        if sw.active and c2.button("Cancel", key=f"cmp_cancel_{sw.id}"):
            cancel_sweep(runs, sw.id)
        if sw.error and not sw.active:
            c1.caption(sw.error.splitlines()[0])


sweeps_panel()

with st.expander("Start a sweep", icon=":material/grid_view:"):
    from defenses.registry import list_defenses

    with st.form("cmp_sweep_form"):
        g = st.columns([3, 1, 1, 1])
        sw_defenses = g[0].multiselect("Defenses", list_defenses(), key="cmp_sw_defenses")
        sw_presets = g[1].multiselect("Presets", ["quick", "paper"], default=["quick"], key="cmp_sw_presets")
        sw_seeds = g[2].number_input("Seeds", 1, 20, 3, key="cmp_sw_seeds")
        sw_pool = g[3].number_input("Pool size", 1, 100000, 500, key="cmp_sw_pool")
        sw_sets = st.text_area("Overrides (one defense.name=value a line)", key="cmp_sw_sets",
                               placeholder="finetune.steps=20")
        sw_cpus = st.number_input("CPUs (local Ray; 0 = all cores)", 0, 512, 0, key="cmp_sw_cpus")
        if st.form_submit_button("Start the sweep", type="primary"):
            try:
                lines = [x.strip() for x in sw_sets.splitlines() if x.strip()]
                spec = SweepSpec.build(sw_defenses, [ref], sw_presets, int(sw_seeds), sets=parse_sets(lines),
                                       pool_size=int(sw_pool))
                sid = submit_sweep(runs, spec, cpus=int(sw_cpus) or None)
            except ValueError as err:
                st.error(str(err))
            else:
                st.success(f"Sweep `{sid}` queued ({spec.size()} cells); it runs in the background on Ray and "
                           "survives page reloads. Progress above.")

# --- the model's family: one history per model (its fingerprint), a repaired model with its parent's runs ------

fam = family(runs, suspect, ref, key=ref_fingerprint(ref))
here_ref, here, made_by = ref, suspect, fam.made_by
if fam.repaired and fam.parent_ref is not None:
    # a repaired model: the page shows its parent's runs (the one that made it highlighted) and its own below
    st.info(f"**{suspect.name}** is the repaired model of {made_by_text(fam, runs)}. Below: every run of its "
            f"parent (this model's siblings; the run that made it is highlighted), then the runs on this model "
            f"itself ({len(fam.children)}).", icon=":material/family_history:")
    if st.button("Open the parent in the analysis pages", key="cmp_open_parent", icon=":material/arrow_upward:"):
        st.session_state["suspect"] = fam.parent_ref
        st.rerun()
    ref, suspect = fam.parent_ref, load_suspect(fam.parent_ref)[0]
    table = runs_table(runs, records=fam.siblings)
else:
    table = runs_table(runs, records=fam.children)
    if fam.repaired:  # the parent no longer loads: its runs are listed from the store alone
        st.info(f"**{suspect.name}** is the repaired model of {made_by_text(fam, runs)}; that suspect cannot be "
                "loaded any more, so only the runs on this model are shown.")
if table.empty:
    st.info("No finished run of this suspect is stored yet. Run a defense on the Defenses page (or "
            f"`backdoor-lens defend DEFENSE {short_ref(ref, runs, suspect)}`) and come back.")
    st.stop()

if made_by is not None and ref != here_ref:
    st.subheader(f"Runs of the parent, {label_of(ref)} ({len(table)})")
else:
    st.subheader(f"Stored runs ({len(table)})")
f = st.columns([2, 2, 2, 1, 1])  # the preset chips ("quick", "paper") need the room
defenses = f[0].multiselect("Defense", sorted(set(table.defense)), default=sorted(set(table.defense)),
                            key="cmp_defenses")
presets = f[1].multiselect("Preset", sorted(set(table.preset)), default=sorted(set(table.preset)), key="cmp_presets")
devices = f[2].multiselect("Device", sorted(set(table.device)), default=sorted(set(table.device)), key="cmp_devices")
min_ba = f[3].slider("Minimum BA", 0.0, 1.0, 0.0, 0.01, key="cmp_min_ba", help=definitions["ba"])
max_asr = f[4].slider("Maximum ASR", 0.0, 1.0, 1.0, 0.01, key="cmp_max_asr", help=definitions["asr"])
pareto_only = st.toggle("Pareto front only", key="cmp_pareto", help=col_defs["pareto"])
shown = filter_runs(table, defenses, presets, devices, min_ba, max_asr, pareto_only)

numbers = {c: st.column_config.NumberColumn(c.upper().replace("_BEFORE", " before"), help=col_defs[c],
                                            format="%.3f")
           for c in ("ba", "asr", "ra", "der", "ba_before", "asr_before", "ra_before")}
config = {c: st.column_config.Column(c.replace("_", " "), help=col_defs[c])
          for c in ("run_id", "defense", "preset", "overrides", "device", "date", "run_dir")}
config |= {"seconds": st.column_config.NumberColumn("seconds", help=col_defs["seconds"], format="%.1f"),
           "clean_images": st.column_config.NumberColumn("clean images", help=col_defs["clean_images"]),
           "held_out": st.column_config.NumberColumn("held out", help=col_defs["held_out"]),
           "pareto": st.column_config.CheckboxColumn("Pareto", help=col_defs["pareto"]),
           "failed": st.column_config.CheckboxColumn("failed", help=col_defs["failed"]), **numbers,
           "asr_after_retune": st.column_config.NumberColumn("ASR after re-tuning", format="%.3f",
                                                             help=col_defs["asr_after_retune"])}
config["run_dir"] = None  # the server's folder: not shown (the run id names a run everywhere)
if made_by is not None and (shown.run_id == made_by.id).any():
    marked = shown.copy()
    marked.insert(0, "made_this_model", marked.run_id == made_by.id)
    config["made_this_model"] = st.column_config.CheckboxColumn("this model", help=MADE_THIS)
    st.dataframe(marked.style.apply(lambda row: ["background-color: rgba(255, 200, 0, 0.25)"
                                                 if row["made_this_model"] else "" for _ in row], axis=1),
                 column_config=config, hide_index=True, key="cmp_table")
else:
    st.dataframe(shown, column_config=config, hide_index=True, key="cmp_table")
if shown.empty:
    st.warning("No run passes the filters.")
else:
    st.caption(f"{len(shown)} of {len(table)} runs; hover a column name for its definition. The Pareto column marks "
               "the front among the runs shown.")
    groups = group_runs(shown)
    if (groups["n_seeds"] > 1).any():
        st.markdown("**Grouped by (defense, preset, overrides)**: each setting's runs: mean ± sample sd, median "
                    "and range, the bootstrap 95% interval of the mean (n >= 5), successes (k/n) and whether the runs "
                    "split; hover a column name for its definition")
        st.dataframe(groups_display(groups), hide_index=True, key="cmp_groups",
                     column_config={c: st.column_config.Column(c, help=h) for c, h in GROUP_DISPLAY.items()})
        st.caption("front: * on the Pareto front of the groups' means; ~ near it (its interval reaches the front: "
                   "the difference is within the runs' spread).")
    c1, c2 = st.columns([2, 3])
    c1.plotly_chart(tradeoff_figure(shown), key="cmp_tradeoff")
    c1.caption("Top left is best. Dashed: the Pareto front; star: the suspect before any defense; diamonds with "
               "error bars: a setting's mean with its range (n < 5) or bootstrap 95% interval (n >= 5), filled on "
               "the front of the settings' means, hollow with a thick rim when the interval reaches that front.")
    c2.plotly_chart(metric_bars_figure(shown), key="cmp_bars")
    c2.caption("One bar per run (defense · preset · id); dashed red: the suspect before the defense. "
               + " ".join(f"{METRIC_LABELS[k]}: {definitions[k]}." for k in ("ba", "asr", "ra", "der")))
    with st.expander("Published numbers for these defenses (another setting)", icon=":material/menu_book:"):
        attack = str((suspect.card.get("trigger") or {}).get("name") or "")
        st.caption("What each method reached where it was published (CIFAR-10, full-width ResNets; BA / ASR as "
                   "fractions), tagged by how it was checked: README = the official README or BackdoorBench's "
                   "leaderboard data, 3rd = a named third-party source, figure = read off an official figure. "
                   "Read them as what the method can do on its home setting, not as a target for this model.")
        st.dataframe(published_records(sorted(set(shown.defense)), attack), hide_index=True, key="cmp_published",
                     column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                    for c in ("BA", "ASR", "BA before", "ASR before")})
    with st.expander("Stress test a run (ASR after re-tuning)"):
        st.markdown(STRESS_EXPLAIN)
        pick = st.selectbox("Run", shown.run_id.tolist(), key="cmp_stress_run",
                            format_func=lambda r: run_label(shown.set_index("run_id").loc[r].to_dict() | {"run_id": r}))
        stress_panel(runs, pick, shown.set_index("run_id").loc[pick, "run_dir"], key="cmp_")

if ref != here_ref:  # a repaired model: its own runs (their "before" is this model)
    own = runs_table(runs, records=fam.children)
    st.subheader(f"Runs on this repaired model ({len(own)})")
    if own.empty:
        st.caption("None yet: run a defense on it on the Defenses page (or "
                   f"`backdoor-lens defend DEFENSE {short_ref(here_ref, runs, here)}`).")
    else:
        st.dataframe(own, column_config=config, hide_index=True, key="cmp_own_table")

# --- side by side -------------------------------------------------------------------------------------

st.subheader("Before / after, side by side")
labels = {ref: f"suspect ({suspect.name})"} | {r.run_dir: run_label(r) for _, r in table.iterrows()}
options = list(labels)
best = best_run(table)
s1, s2 = st.columns(2)
left = s1.selectbox("Left", options, index=0, format_func=labels.get, key="cmp_left")
default_right = made_by.run_dir if made_by is not None and made_by.run_dir in options else \
    (best.run_dir if best is not None else options[0])
right = s2.selectbox("Right", options, index=options.index(default_right),
                     format_func=labels.get, key="cmp_right")
chosen = list(dict.fromkeys([left, right]))
if len(chosen) == 1:
    st.warning("Both sides show the same model; pick another one on the right.")
cols = st.columns(len(chosen))
for col, model_ref in zip(cols, chosen, strict=True):
    m = load_suspect(model_ref)[0].card.get("metrics") or {}
    col.markdown(f"**{labels[model_ref]}**")
    for box, key in zip(col.columns(3), ("ba", "asr", "ra"), strict=True):
        box.metric(key.upper(), "n/a" if m.get(key) is None else f"{100 * m[key]:.1f}%", help=definitions[key])
view = st.segmented_control("View", list(PART_TITLES), format_func=PART_TITLES.get, default="gradcam",
                            key="cmp_view") or "gradcam"
n = sample_size()
trigger = suspect.trigger


@st.cache_data(show_spinner="Computing Grad-CAM maps ...", max_entries=16)
def cached_gradcam(model_ref: str, base_ref: str, n: int):
    """Grad-CAM of model ``model_ref`` on the images and trigger of suspect ``base_ref``."""
    base, base_lock = load_suspect(base_ref)
    with base_lock:
        layer = default_target_layer(base.model, base.input_shape)
    smp = paired_sample(base.test, base.trigger, n)
    s, lk = load_suspect(model_ref)
    with lk:
        return compare_gradcam(s.model, smp, base.trigger, layer), smp


@st.cache_data(show_spinner="Measuring activation norms ...", max_entries=16)
def cached_activations(model_ref: str, base_ref: str, n: int):
    base = load_suspect(base_ref)[0]
    smp = paired_sample(base.test, base.trigger, n)
    s, lk = load_suspect(model_ref)
    with lk:
        return activation_summary(s.model, smp)


@st.cache_data(show_spinner="Extracting features ...", max_entries=16)
def cached_embedding(model_ref: str, base_ref: str, n: int, method: str):
    base = load_suspect(base_ref)[0]
    s, lk = load_suspect(model_ref)
    with lk:
        return embed_features(with_model(base, s.model), n, method)


@st.cache_data(show_spinner="Ablating every block's skip connection ...", max_entries=16)
def cached_ablation(model_ref: str, base_ref: str, n: int):
    base = load_suspect(base_ref)[0]
    s, lk = load_suspect(model_ref)
    with lk:
        return ablation_curves(s.model, base.test, base.trigger, n)


side_fig = None
if view != "features" and trigger is None:
    st.info("No trigger is known for this suspect: this view compares clean and triggered inputs and needs one. "
            "The feature space works without one; or recover a trigger on the Detection page and adopt it.")
elif view == "gradcam":
    k = 8
    cols = st.columns(len(chosen))
    for col, model_ref in zip(cols, chosen, strict=True):
        res, smp = cached_gradcam(model_ref, ref, 16)
        col.image(gradcam_grid(smp, res, k, scale=4), width="stretch",
                  caption=f"{labels[model_ref]}: clean on top, triggered below ({res.method} at {res.layer}, "
                          "predicted class)")
        col.metric("Trigger-attention share, triggered inputs", f"{100 * res.mean_triggered_share:.1f}%",
                   delta=delta_points(res.mean_clean_share, res.mean_triggered_share, "vs. clean"),
                   delta_color=delta_color("trigger_share"), help="mean over the 16 images of sum(map on the trigger's pixels) / "
                   f"sum(map); chance (the trigger's share of the image) {100 * res.footprint_fraction:.1f}%"
                   + ("; each image's own trigger pixels (the trigger differs per image)" if res.sample_specific
                      else ""))
elif view == "activations":
    side_fig = activations_figure({labels[r]: cached_activations(r, ref, n) for r in chosen})
    st.plotly_chart(side_fig, key="cmp_activations")
    st.caption(f"Per layer, the mean l_inf bias of its top 5% channels on {n} clean and triggered images: "
               "log(l_inf growth) − log(l1 growth) under the trigger (0 = both grow alike). A defense that removes "
               "the backdoor's channels lowers the deep layers' bars.")
elif view == "features":
    method = st.radio("Embedding", ["PCA", "UMAP"], horizontal=True, key="cmp_embedding",
                      help="PCA is instant; UMAP is computed once per model and sample size.")
    embs = {labels[r]: cached_embedding(r, ref, n, method) for r in chosen}
    side_fig = embedding_figure(embs, suspect.classes)
    st.plotly_chart(side_fig, key="cmp_features")
    if trigger is not None:
        mc = st.columns(len(embs))
        for box, (label, e) in zip(mc, embs.items(), strict=True):
            box.metric(f"Poisoned-cluster separation · {label}", f"{e.separation['score']:.2f}",
                       help=f"mean share of each triggered point's {e.separation['k']} nearest neighbours (full "
                            f"feature space) that are triggered; chance {e.separation['chance']:.2f}")
    st.caption(f"Penultimate features of {n} clean test images (circles) and {n // 2} triggered copies (x), "
               f"coloured by true class; one {method} per model.")
elif view == "ablation":
    if not list_residual_blocks(suspect.model):
        st.info(f"{suspect.card.get('arch')} has no skip connections, so the skip-connection ablation does not apply.")
    else:
        results = {labels[r]: cached_ablation(r, ref, n) for r in chosen}
        side_fig = ablation_figure(results)
        st.plotly_chart(side_fig, key="cmp_ablation")
        st.caption("BA and ASR as one block's skip output is scaled by γ from 1 to 0; bold: each model's critical "
                   "block (" + "; ".join(f"{k}: {v.critical_block or 'none'}" for k, v in results.items()) + "). A repaired "
                   "model whose ASR is already low at γ = 1 has no shortcut left to cut.")
        for k, v in results.items():
            if v.critical_block_note():
                st.warning(f"{k}: {v.critical_block_note()}", icon=":material/warning:")

# --- export -------------------------------------------------------------------------------------------

st.subheader("Export")
e = st.columns(4)
stem = suspect.name.replace("/", "_").replace(" ", "_")
bb = st.toggle("CSV in BackdoorBench's leaderboard columns", key="cmp_bb_csv",
               help="one row per (defense, preset, overrides): attack, defense, model, dataset, pratio, clean_acc, "
                    "asr, ra (in percent, as the leaderboard shows them) plus sd, DER, n and seconds")
e[0].download_button("Table (CSV)", backdoorbench_csv(group_runs(shown), suspect.card) if bb else table_csv(shown),
                     file_name=f"{stem}-{'backdoorbench' if bb else 'runs'}.csv", mime="text/csv",
                     icon=":material/table:", on_click="ignore", key="cmp_csv")
e[1].download_button("Table (JSON)", table_json(shown, ref, suspect.trigger), file_name=f"{stem}-runs.json", mime="application/json",
                     icon=":material/data_object:", on_click="ignore", key="cmp_json",
                     help="the rows with every column's definition")
charts = run_figures(shown) if not shown.empty else {}
if side_fig is not None:
    charts[f"side_by_side_{view}"] = side_fig
e[2].download_button("Charts (PNG, zip)", lambda: figures_zip(charts), file_name=f"{stem}-charts.zip",
                     mime="application/zip", icon=":material/image:", on_click="ignore", key="cmp_png",
                     disabled=not charts, help="the charts on this page rendered by a headless Chromium (kaleido); "
                     "each chart's camera button also saves it as PNG")
picked = table.set_index("run_dir").loc[[r for r in chosen if r != ref], "run_id"].tolist()
report_n = min(n, 200)  # the report runs all four analyses on every model shown: cap its sample
e[3].download_button("HTML report", lambda: html_report(here_ref, store=runs, runs=picked or None, n=report_n),
                     file_name=f"{stem}-report.html", mime="text/html", icon=":material/description:",
                     on_click="ignore", key="cmp_html",
                     help=f"one self-contained file (opens offline): every stored run of this suspect, the charts, "
                          f"and the suspect side by side with the run(s) chosen above on {report_n} images; takes one to "
                          "a few minutes on a CPU")
