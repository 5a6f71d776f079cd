"""Grad-CAM page: where does the model look, on clean vs. triggered copies of the same images?"""

from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.figures import footprint_tile
from analysis.gradcam import (
    CAM_METHODS,
    TARGET_KINDS,
    candidate_layers,
    compare_gradcam,
    default_target_layer,
)
from analysis.samples import paired_sample
from dashboard.common import (
    load_suspect,
    model_line,
    overlay,
    reference_models,
    sidebar,
    stop_unless_applicable,
    trigger_notice,
)
from dashboard.signs import delta_color, delta_points
from dashboard.trigger_source import pick_trigger

SHARE_COLOUR = ("the change against clean inputs; a rise is drawn red, as on the Compare page: the more a map moves "
                "onto the trigger, the more the trigger drives the decision (a repaired model should lower it)")

ref = sidebar()
suspect, lock = load_suspect(ref)

st.title("Grad-CAM: where the model looks")
model_line(ref)
trigger_notice(suspect)
stop_unless_applicable(suspect, ("module_hooks",), "Grad-CAM")
st.markdown(
    "Grad-CAM (Selvaraju et al., ICCV 2017) weights a layer's activation maps by the gradient of a class score and "
    "shows which pixels drive the decision. On a backdoored model the maps of triggered inputs collapse onto the "
    "trigger, while a clean model keeps looking at the object (Xu et al., arXiv 2002.12162, Fig. 1). "
    "The **trigger-attention share** is the fraction of a map's mass that lies on the pixels the trigger changes."
)

picked = pick_trigger(ref, suspect, "cam_trigger_from")
if picked is None:
    st.info("No trigger is known for this suspect and no demo suspect's trigger fits its data, so there is nothing "
            "to compare against. Recover a trigger on the Detection page and adopt it.")
    st.stop()
trigger_ref, trigger = picked


@st.cache_data(show_spinner="Computing Grad-CAM maps ...", max_entries=32)
def cached_gradcam(ref: str, trigger_ref: str, n: int, layer: str, method: str, target_kind: str, seed: int = 0):
    """Maps of model ``ref`` on images triggered with the trigger of suspect ``trigger_ref``."""
    s, lk = load_suspect(ref)
    trig = load_suspect(trigger_ref)[0].trigger
    smp = paired_sample(s.test, trig, n, seed)
    with lk:
        res = compare_gradcam(s.model, smp, trig, layer, method, target_kind)
    return res, smp


with lock:
    layers = candidate_layers(suspect.model)
    default_layer = default_target_layer(suspect.model, suspect.input_shape)
c1, c2, c3, c4 = st.columns([1, 1, 1, 1])
method = c1.selectbox("Method", list(CAM_METHODS), key="cam_method",
                      help="ScoreCAM runs one forward pass per channel: slow on a CPU.")
layer = c2.selectbox("Target layer", layers, index=layers.index(default_layer), key="cam_layer",
                     help="Default: the deepest block whose map is at least 7 pixels wide.")
target_kind = c3.selectbox("Explain the class", TARGET_KINDS, key="cam_target",
                           help="predicted: the model's own decision; true: the image's label; target: the attack's label")
n = c4.slider("Images", 8, 64, 16, step=8, key="cam_n")
if method == "ScoreCAM" and n > 16:
    st.warning("ScoreCAM is slow on a CPU (seconds per image); consider 8-16 images.")

res, smp = cached_gradcam(ref, trigger_ref, n, layer, method, target_kind)
classes = suspect.classes
OWN = " (each image's own trigger pixels)" if res.sample_specific else ""
if res.sample_specific:
    st.caption(f"This trigger ({trigger.name}) puts its pixels somewhere else on every image, so every share below is "
               "measured on **that image's own trigger pixels** and chance is the mean of their shares of the image; "
               "the outlines are under *Trigger footprint*.")

m1, m2, m3 = st.columns(3)
if res.whole_image:
    st.info(f"This trigger ({trigger.name}) changes {100 * res.footprint_fraction:.0f}% of the image, so the "
            "trigger-attention share is near 100% whatever the model looks at and says nothing. Shown instead: "
            "how far the map **moves** when the trigger is added, and the share of the map on the "
            f"{100 * res.strongest_fraction:.0f}% of pixels the trigger changes **most**.",
            icon=":material/info:")
    m1.metric("Map shift, clean → triggered", f"{res.mean_shift:.2f}",
              help="mean over images of the total-variation distance between the normalised maps of a clean image "
                   "and its triggered copy: 0 = same attention, 1 = somewhere else entirely")
    m2.metric("Share on the trigger's strongest pixels, triggered inputs",
              f"{100 * res.mean_triggered_strong_share:.1f}%",
              delta=delta_points(res.mean_clean_strong_share, res.mean_triggered_strong_share, "vs. clean"),
              delta_color=delta_color("trigger_share"), help=SHARE_COLOUR)
    m3.metric("Strongest pixels' share of the image", f"{100 * res.strongest_fraction:.1f}%",
              help="the share a map spread evenly over the image would put on them (chance level)")
else:
    m1.metric("Trigger-attention share, clean inputs", f"{100 * res.mean_clean_share:.1f}%",
              help=f"mean over images of sum(map on trigger footprint{OWN}) / sum(map)")
    m2.metric("Trigger-attention share, triggered inputs", f"{100 * res.mean_triggered_share:.1f}%",
              delta=delta_points(res.mean_clean_share, res.mean_triggered_share, "vs. clean"),
              delta_color=delta_color("trigger_share"), help=SHARE_COLOUR)
    m3.metric("Footprint share of the image", f"{100 * res.footprint_fraction:.1f}%",
              help="the share a map spread evenly over the image would put on the trigger (chance level)"
                   + ("; the mean over images of each image's own trigger's share" if res.sample_specific else ""))

st.subheader("Clean | triggered, side by side")
per_row = 4
for start in range(0, len(smp), per_row):
    cols = st.columns(per_row * 2)
    for j in range(start, min(start + per_row, len(smp))):
        k = 2 * (j - start)
        true = classes[int(smp.labels[j])]
        cols[k].image(overlay(smp.clean[j], res.clean_cams[j]), width="stretch",
                      caption=f"clean · true {true} · pred {classes[int(res.clean_pred[j])]}"
                              + ("" if res.whole_image else f" · share {100 * res.clean_share[j]:.0f}%"))
        cols[k + 1].image(overlay(smp.triggered[j], res.triggered_cams[j]), width="stretch",
                          caption=f"triggered · pred {classes[int(res.triggered_pred[j])]} · "
                                  + (f"shift {res.shift[j]:.2f}" if res.whole_image
                                     else f"share {100 * res.triggered_share[j]:.0f}%"))

def other_layer(model_ref: str) -> str:
    """This page's target layer where the other model has it, else that model's default."""
    other = load_suspect(model_ref)[0]
    return layer if layer in candidate_layers(other.model) else default_target_layer(other.model, other.input_shape)


st.subheader("Backdoored vs. clean model (the 2 x 2 grid of Xu et al.)")
rows = None
if trigger_ref != ref and suspect.trigger is None:
    # a model without a trigger of its own, shown under a backdoored suspect's trigger: that suspect is the other row
    back_res, _ = cached_gradcam(trigger_ref, trigger_ref, n, other_layer(trigger_ref), method, target_kind)
    rows = ((f"backdoored ({trigger_ref.removeprefix('demo:')}, the trigger's own model)", back_res),
            (f"this model ({suspect.name})", res))
else:
    refs = reference_models(ref, suspect)
    if not refs:
        st.info("No clean reference model trained on the same data is available for this suspect.")
    else:
        ref_clean = st.selectbox("Clean reference model", refs, key="cam_reference")
        clean_res, _ = cached_gradcam(ref_clean, trigger_ref, n, other_layer(ref_clean), method, target_kind)
        rows = ((f"suspect ({suspect.name})", res), (f"clean reference ({ref_clean})", clean_res))
if rows is not None:
    st.caption("Mean map over the sample; the number is the mean trigger-attention share"
               + (" on the trigger's strongest pixels." if res.whole_image else "."))
    grid = st.columns([1, 2, 2])
    grid[1].markdown("**clean input**")
    grid[2].markdown("**triggered input**")
    for title, r in rows:
        row = st.columns([1, 2, 2])
        row[0].markdown(f"**{title}**")
        row[1].image(overlay(smp.clean.mean(0), r.clean_cams.mean(0)), width="stretch",
                     caption=f"share {100 * (r.mean_clean_strong_share if res.whole_image else r.mean_clean_share):.1f}%")
        row[2].image(overlay(smp.triggered.mean(0), r.triggered_cams.mean(0)), width="stretch",
                     caption=f"share {100 * (r.mean_triggered_strong_share if res.whole_image else r.mean_triggered_share):.1f}%")

with st.expander("Trigger footprint"):
    if res.sample_specific:  # each image's own outline, drawn on it
        k = min(per_row * 2, len(smp))
        cols = st.columns(k)
        for j in range(k):
            cols[j].image(footprint_tile(res.footprints[j], image=smp.clean[j].numpy(), scale=4), width="stretch",
                          caption=f"image {j + 1}: {100 * res.footprints[j].mean():.1f}%")
        st.caption("Each image's own trigger pixels (red) on the image: the trigger differs per image, and each "
                   "map's share is measured on its own image's pixels. Below: where any of the "
                   f"{len(smp)} images' triggers lie ({100 * np.mean(res.footprint):.1f}% of the image).")
    st.image(footprint_tile(np.asarray(res.footprint, dtype=bool), scale=6),
             caption="pixels the trigger changes (red)" + (" on any image of the sample" if res.sample_specific
                                                           else ""))
