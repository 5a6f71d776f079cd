"""Screen inputs page: STRIP, SCALE-UP and IBD-PSC on the test split (histograms, ROC, TPR at the chosen FPR) and
a verdict for the user's own PNG/JPEG images, next to the image and its Grad-CAM map."""

from __future__ import annotations

import streamlit as st
import torch

from analysis.figures import roc_figure, screening_histogram_figure
from analysis.gradcam import compute_cams, default_target_layer
from analysis.screening import (
    DEFAULT_METHOD,
    get_screener,
    list_screeners,
    load_image,
    screen_images,
    screen_suspect,
)
from dashboard.common import (
    StreamlitProgress,
    device,
    load_suspect,
    memoized,
    model_line,
    overlay,
    sidebar,
    to_display,
    trigger_notice,
)

ref = sidebar()
suspect, lock = load_suspect(ref)

st.title("Screen inputs")
model_line(ref)
st.markdown(
    "Input screening asks, for **one input at a time**, whether it carries a trigger: a deployed model can refuse "
    "or log a flagged input without being repaired. Every method gives each image a score (higher = more likely "
    "triggered); the **threshold** is chosen on clean *defense-pool* images only, for a target false-positive rate. "
    "With the suspect's trigger (known or adopted on the Detection page) the clean and triggered test images show "
    "how well the score separates them: the histograms, the ROC curve and its area (AUROC), and the share of "
    "triggered images caught at the threshold (TPR)."
)
trigger_notice(suspect)

methods = list_screeners()
c1, c2, c3, c4 = st.columns([1, 1, 1, 1])
method = c1.selectbox("Method", methods, index=methods.index(DEFAULT_METHOD), key="scr_method",
                      format_func=lambda m: get_screener(m).title)
fpr = c2.select_slider("Target FPR (clean pool)", [0.01, 0.02, 0.05, 0.1, 0.2], value=0.05, key="scr_fpr",
                       help="share of clean defense-pool images allowed above the threshold")
n_pool = c3.number_input("Pool images (calibration)", 20, len(suspect.defense_pool), min(200, len(suspect.defense_pool)),
                         step=20, key="scr_pool")
limit = c4.number_input("Test images", 20, len(suspect.test), min(300, len(suspect.test)), step=50, key="scr_limit")
screener = get_screener(method)
st.info(f"**{screener.title}** ({screener.paper}). {screener.summary}", icon=":material/school:")

key = (ref, method, float(fpr), int(n_pool), int(limit))
if st.button("Screen the test split", type="primary", key="scr_run", icon=":material/play_arrow:"):
    bar = StreamlitProgress(f"{screener.title} on {int(limit)} test images")
    with lock:
        st.session_state["scr_result"] = (key, memoized(
            "screening", key, lambda: screen_suspect(suspect, method, fpr=float(fpr), n_pool=int(n_pool),
                                                     limit=int(limit), device=device(), progress=bar), 8))
    bar.done()
stored = st.session_state.get("scr_result")
result = stored[1] if stored and stored[0] == key else None
if result is None:
    st.caption("Press the button to score the pool and the test images (a few seconds to a minute on a CPU).")
else:
    m = st.columns(4)
    m[0].metric("AUROC", "n/a" if result.auroc is None else f"{result.auroc:.3f}",
                help="area under the ROC curve of clean vs. triggered test images (0.5 = chance)")
    m[1].metric(f"TPR at {100 * result.fpr_target:g}% FPR", "n/a" if result.tpr_at_fpr is None
                else f"{100 * result.tpr_at_fpr:.1f}%", help="share of triggered test images above the threshold")
    m[2].metric("FPR on clean test images", f"{100 * result.fpr:.1f}%",
                help="share of clean test images above the threshold (the pool-chosen target, measured)")
    m[3].metric("Time", f"{result.seconds:.1f} s", help=f"device {result.device}; calibration "
                f"{result.seconds_calibration:.1f} s")
    g1, g2 = st.columns(2)
    g1.plotly_chart(screening_histogram_figure(result), key="scr_hist")
    all_to_all = suspect.trigger is not None and suspect.trigger.mapping == "all-to-all"
    g1.caption("Score histograms: grey, the clean pool that set the threshold; blue, clean test images; red, "
               "triggered copies of test images (" + ("all-to-all: every class, as for the ASR" if all_to_all else
                                                      "all-to-one: target-class images left out, as for the ASR")
               + ").")
    if result.auroc is None:
        g2.info("No trigger known for this suspect: adopt one on the Detection page to measure AUROC and TPR.")
    else:
        g2.plotly_chart(roc_figure(result), key="scr_roc")
        g2.caption("ROC curve over every threshold; the cross is the pool-chosen threshold.")

st.subheader("Your own images")
st.markdown(f"Drop PNG or JPEG images: each is converted to the model's {suspect.input_shape[0]}-channel "
            f"{suspect.input_shape[2]}×{suspect.input_shape[1]} input and gets a score, a verdict at the threshold "
            "above (calibrated on the clean pool) and the model's Grad-CAM map for its predicted class.")
files = st.file_uploader("Images to screen", type=["png", "jpg", "jpeg"], accept_multiple_files=True,
                         key="scr_files")
if files:
    valid = []  # (name, file bytes, image tensor)
    for f in files:
        try:
            data = f.getvalue()
            valid.append((f.name, data, load_image(data, suspect.input_shape, f.name)))
        except ValueError as err:
            st.error(str(err))
    if valid:
        calibration = result.calibration if result is not None else None
        with st.spinner("Scoring ..."), lock:
            verdicts = screen_images(suspect, method, [d for _, d, _ in valid], names=[n for n, _, _ in valid],
                                     calibration=calibration, fpr=float(fpr), n_pool=int(n_pool), device=device())
            model = suspect.model.eval()
            layer = default_target_layer(model, tuple(suspect.input_shape))
            x = torch.stack([t for _, _, t in valid]).to(next(model.parameters()).device)
            cams = compute_cams(model, x, layer)
        if calibration is None:
            st.caption(f"Threshold calibrated now on {int(n_pool)} clean pool images for a {100 * fpr:g}% FPR.")
        for (_, _, img), cam, v in zip(valid, cams, verdicts, strict=True):
            with st.container(border=True):
                a, b, c = st.columns([1, 1, 2])
                a.image(to_display(img, 4), caption=v.name, clamp=True)
                b.image(overlay(img, cam, 4), caption=f"Grad-CAM ({layer}), predicted class")
                (c.error if v.flagged else c.success)(
                    f"**{v.verdict}**: score {v.score:.4f} vs. threshold {v.threshold:.4f}")
                c.caption(f"predicted class {v.predicted} ({v.predicted_class})")
