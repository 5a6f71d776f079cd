"""Activation statistics page: per-channel l1 / l2 / l_inf norms, clean vs. triggered."""

from __future__ import annotations

import streamlit as st

from analysis.activations import NORMS, activation_stats, channel_maps, default_layers
from analysis.figures import NORM_LABELS, activations_figure, norm_box_figure, norm_histogram_figure
from analysis.samples import paired_sample
from dashboard.common import (
    load_suspect,
    model_line,
    sample_size,
    sidebar,
    stop_unless_applicable,
    to_display,
    trigger_notice,
)
from dashboard.trigger_source import pick_trigger

ref = sidebar()
suspect, lock = load_suspect(ref)

st.title("Activation statistics: l1, l2 and l_inf per channel")
model_line(ref)
trigger_notice(suspect)
stop_unless_applicable(suspect, ("module_hooks",), "Activation statistics")
st.markdown(
    "Every channel's activation map is reduced to three norms per image: l1 (total activity), l2 and l_inf (the "
    "single strongest response). Xu et al. (arXiv 2002.12162) observed that a trigger causes a *sparse spike* in a few "
    "channels: it dominates l_inf but is diluted in l1 and l2. The **l_inf bias** of a channel is "
    "log(l_inf growth) − log(l1 growth) under the trigger (0 = both grow alike); channels with a large bias are what "
    "l_inf neuron pruning removes."
)

picked = pick_trigger(ref, suspect, "act_trigger_from")
if picked is None:
    st.info("No trigger is known for this suspect and no demo suspect's trigger fits its data: clean vs. triggered "
            "statistics need one. Recover one on the Detection page and adopt it.")
    st.stop()
trigger_ref, trigger = picked


@st.cache_data(show_spinner="Measuring activation norms ...", max_entries=16)
def cached_stats(ref: str, trigger_ref: str, n: int, seed: int = 0):
    """Norms of model ``ref`` on clean images and their copies with the trigger of suspect ``trigger_ref``."""
    s, lk = load_suspect(ref)
    smp = paired_sample(s.test, load_suspect(trigger_ref)[0].trigger, n, seed)
    with lk:
        return activation_stats(s.model, smp.clean, smp.triggered)


stats = cached_stats(ref, trigger_ref, sample_size())
summary = stats.layer_summary()

st.subheader("l_inf bias per layer")
st.plotly_chart(activations_figure({suspect.name: summary}), key="bias_per_layer")
st.caption("Mean l_inf bias of each layer's top 5% channels. Early layers see the raw trigger pixels in any model; "
           "a large bias in deep layers points at channels the backdoor has taken over.")

st.subheader("Distributions, clean vs. triggered")
c1, c2 = st.columns([1, 3])
norm = c1.radio("Norm", NORMS, format_func=lambda k: NORM_LABELS[k], key="act_norm")
layer = c1.selectbox("Layer", stats.layers, index=len(stats.layers) - 1, key="act_layer")
c2.plotly_chart(norm_histogram_figure(stats, layer, norm), key="norm_hist")
c2.caption(f"{layer}: each channel's {NORM_LABELS[norm]} averaged over {stats.clean[layer].shape[0]} images.")

st.plotly_chart(norm_box_figure(stats, norm), key="norm_box")
st.caption("Per-channel means, scaled by the layer's clean mean so layers compare; one box per layer and condition.")

st.subheader("Top channels by l_inf bias")
top = stats.ranking(layer=None, top=15)
show = top[["layer", "channel", "linf_bias", "linf_score", "growth_linf", "growth_l1", "growth_l2",
            "linf_clean_mean", "linf_trig_mean"]]
st.dataframe(show.style.format(precision=3), hide_index=True)
st.caption("growth_p = mean p-norm on triggered images / on clean images; linf_score = E‖A(x+trigger)‖∞ − E‖A(x)‖∞.")

st.subheader("Activation maps of the top channels")
pick = st.selectbox("Layer", stats.layers, index=stats.layers.index(top.layer.iloc[0]), key="maps_layer")
chans = stats.ranking(layer=pick, top=4).channel.tolist()
smp = paired_sample(suspect.test, trigger, 4)
with lock:
    clean_maps = channel_maps(suspect.model, smp.clean, pick, chans)
    trig_maps = channel_maps(suspect.model, smp.triggered, pick, chans)
vmax = max(float(clean_maps.max()), float(trig_maps.max()), 1e-8)
for i in range(len(smp)):
    cols = st.columns(2 + 2 * len(chans))
    cols[0].image(to_display(smp.clean[i], 3), caption="clean")
    cols[1].image(to_display(smp.triggered[i], 3), caption="triggered")
    for j, ch in enumerate(chans):
        scale = max(1, 84 // clean_maps.shape[-1])
        cols[2 + 2 * j].image(to_display(clean_maps[i, j][None] / vmax, scale), caption=f"ch {ch} clean")
        cols[3 + 2 * j].image(to_display(trig_maps[i, j][None] / vmax, scale), caption=f"ch {ch} trig.")
st.caption("|activation| of the top-ranked channels (brighter = stronger), one shared scale.")

with st.expander("Layers analysed"):
    st.write(", ".join(default_layers(suspect.model)))
