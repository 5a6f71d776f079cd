"""Detection page: Neural Cleanse trigger reverse-engineering, per-class anomaly indices, and adopting a trigger."""

from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.figures import (
    anomaly_figure,
    class_labels,
    footprint_tile,
    framed,
    mask_norm_figure,
    mask_pattern_tile,
)
from analysis.reverse import (
    FULL_IMAGE_SHARE,
    ScanConfig,
    known_footprint_share,
    known_trigger_overlap,
    scan_images,
    scope_note,
)
from dashboard.common import (
    StreamlitProgress,
    load_suspect,
    model_line,
    runs_root,
    sidebar,
    to_display,
    trigger_notice,
)
from runs.scans import save_recovered_suspect, scan_suspect, stored_scan
from suspects.stored_trigger import attack_name

ref = sidebar()
suspect, lock = load_suspect(ref)

st.title("Detection: recover the trigger")
model_line(ref)
st.markdown(
    "Neural Cleanse (Wang et al., *IEEE S&P 2019*) asks, for every class t, how small a patch can be that flips clean "
    "images to t: it optimises a mask m and a pattern p so that (1 − m)·x + m·p is classified as t, penalising the "
    "mask's L1 norm with a weight λ that follows the official schedule (0 until the attack succeeds on ≥ 99% of the "
    "images, then 10⁻³, doubled or divided by 2^1.5 with a patience of 5 epochs). A backdoor target needs a far smaller "
    "mask than the other classes. The **anomaly index** of a class is (median − L1) / (1.4826 · MAD) of the mask "
    "norms of the classes that **converged** (some epoch's stamped images were classified as t at ≥ 99%: the "
    "*epoch success* in the table below); a class above the threshold is flagged. "
    "Only clean **defense-pool** images of the other classes are used, never the test split. What it can see: one "
    "small, input-agnostic patch that flips every image; a trigger spread over the whole image (blended, SIG) or made "
    "anew for every image (input-aware, WaNet's warp, BppAttack's quantisation, Adaptive-Blend) is beyond it."
)
trigger_notice(suspect)

with st.form("scan_params"):
    c1, c2, c3, c4 = st.columns(4)
    n_images = c1.number_input("Images (defense pool)", 10, 5000, 300, step=50,
                               help="clean defense-pool images the masks are optimised on")
    steps = c2.number_input("Epochs per class", 1, 5000, ScanConfig.steps, step=10,
                            help=f"at most; an epoch is {ScanConfig.mini_batches} Adam steps on "
                                 f"{ScanConfig.batch_size} images")
    lam = c3.number_input("λ₀ (init_cost)", 0.0001, 10.0, ScanConfig.init_cost, step=0.001, format="%.4f",
                          help="the mask-L1 weight set once the attack succeeds; the schedule then adapts it")
    threshold = c4.number_input("Threshold (anomaly index)", 0.5, 20.0, 2.0, step=0.5,
                                help="a class whose anomaly index exceeds this is flagged (the paper uses 2)")
    run = st.form_submit_button("Scan all classes", type="primary")

config = ScanConfig(n_images=int(n_images), steps=int(steps), init_cost=float(lam), threshold=float(threshold))
root = runs_root()
result = stored_scan(suspect, config, root)
if run and result is None:
    st.button("Cancel scan", key="cancel_scan", help="stops the scan; nothing is stored")
    bar = StreamlitProgress(f"Neural Cleanse over {suspect.num_classes} classes")
    with lock:
        result = scan_suspect(suspect, config, cache_root=root, progress=bar)
    bar.done()
if result is None:
    st.info(f"No scan of this suspect with these settings yet. A scan optimises on up to {config.images_per_class:,} "
            f"stamped images per class ({suspect.num_classes} classes; about 2-3 min for the demo models and up to "
            f"20 min for a CIFAR-10 ResNet-18 on 2 CPU cores); its result is stored and shown instantly next time.")
    st.stop()

classes = suspect.classes
names = class_labels(classes)
known = suspect.trigger if suspect.trigger is not None and suspect.trigger.name != "recovered" else None
st.caption(f"Scan of {result.config.get('images', '?')} defense-pool images, at most {result.config.get('steps', '?')} "
           f"epochs per class, λ₀ = {result.config.get('init_cost', '?')}; {result.stored_text()}.")

# verdict with its evidence
top = result.most_suspicious
verdict = result.verdict(classes)
getattr(st, verdict.kind)(f"**Verdict: {verdict.title}.** {verdict.sentence}")
# a sample-specific trigger (input-aware) is compared with each scan image's own footprint
own_x = scan_images(suspect, config) if known is not None and known.sample_specific else None
known_share = known_footprint_share(known, own_x) if known is not None else None
known_attack = attack_name(known)
scope = scope_note(verdict.level, known_share, (known_attack or known.name) if known is not None else None,
                   attack=known_attack, mapping=known.mapping if known is not None else "all-to-one")
if scope:
    st.info(scope, icon=":material/center_focus_weak:")
if known is not None and known.mapping == "all-to-one":
    ov = known_trigger_overlap(result.masks[known.target], known, own_x)
    hit = "flagged" if known.target in result.flagged else "**not** flagged"
    own = (f"each of {ov['per_image']} scan images' own trigger pixels (this trigger differs per image; means over "
           "them), which are" if "per_image" in ov else "the known trigger's pixels, which are")
    st.markdown(f"Known attack: **{known.name}**, target class {known.target} ({classes[known.target]}), {hit}. "
                f"Its recovered mask puts **{100 * ov['mass_on_trigger']:.0f}%** of its mass on {own} "
                f"{100 * ov['footprint_share']:.1f}% of the image (IoU of the mask's peak with "
                f"them: {ov['iou']:.2f}); on their left-right mirror image (learnt through flip augmentation) "
                f"**{100 * ov['mass_on_mirror']:.0f}%** (IoU {ov['iou_mirror']:.2f}); closer: {ov['closer']}."
                + (f" The trigger changes {100 * ov['footprint_share']:.0f}% of the image, so any mask lies mostly "
                   "on its pixels: these shares say nothing here." if ov["footprint_share"] > FULL_IMAGE_SHARE
                   else ""))
elif known is not None:  # all-to-all: no single target class whose recovered mask could be compared
    st.markdown(f"Known attack: **{known.name}**, all-to-all: each class y goes to class (y + 1) mod "
                f"{suspect.num_classes}, so there is no single target class whose recovered mask could be compared "
                "with the known trigger.")

# the reference a user compares against: the same scan of the clean demo model (issue 13.5)
reference = None
if suspect.card.get("name") != "clean" or suspect.card.get("data", {}).get("name") != "demo":
    import suspects as _suspects

    clean = _suspects.load("demo:clean")
    reference = stored_scan(clean, config, root)
    if reference is None:
        slot = st.empty()  # the button goes once the reference is there
        if slot.button("Scan the clean reference (demo:clean, same budget, about 1-3 min)", key="scan_reference"):
            slot.empty()
            bar = StreamlitProgress("Neural Cleanse on the clean demo model")
            reference = scan_suspect(clean, config, cache_root=root, progress=bar)
            bar.done()
    if reference is not None:
        def _largest(a: np.ndarray) -> float:
            return float(np.nanmax(a)) if np.isfinite(a).any() else float("nan")

        ref_max = _largest(reference.anomaly)
        st.caption(f"Reference: the clean demo model scanned with the same budget has anomaly indices up to "
                   f"**{ref_max:.2f}** (hollow bars, sorted high to low); this model's largest is "
                   f"**{_largest(result.anomaly):.2f}**. Indices a clean model also reaches are no evidence.")
left, right = st.columns(2)
left.plotly_chart(anomaly_figure(result, classes, reference=reference), key="anomaly_bars")
right.plotly_chart(mask_norm_figure(result, classes), key="l1_bars")

st.subheader("Recovered masks and patterns")
st.caption("Per class, in class order: the mask m (white = 1), the pattern p, and m·p as it is stamped. Flagged "
           "classes are marked; a class that never reached 99% success did not converge (no norm, no index).")
per_row = 5
for start in range(0, len(classes), per_row):
    cols = st.columns(per_row)
    for j, k in enumerate(range(start, min(start + per_row, len(classes)))):
        flag = " · **flagged**" if k in result.flagged else ""
        cols[j].image(framed(mask_pattern_tile(result, k), 6), width="stretch")
        if result.converged[k]:
            cols[j].caption(f"{names[k]} · L1 {result.l1[k]:.1f} · anomaly {result.anomaly[k]:.2f}{flag}")
        else:
            cols[j].caption(f"{names[k]} · did not converge (last mask shown)")
with st.expander("Per-class numbers", icon=":material/table:"):
    st.dataframe(result.class_table(classes), hide_index=True, key="scan_table", column_config={
        "converged": st.column_config.CheckboxColumn(
            "converged", help=f"some epoch's success reached {ScanConfig.success_threshold:.0%} (the official rule)"),
        "epoch_success": st.column_config.NumberColumn(
            "epoch success", format="%.3f", help="the success of the epoch whose mask was kept: the share of that "
            "epoch's stamped images classified as the class, measured while the mask was optimised. Converged = at "
            f"least {ScanConfig.success_threshold:g}."),
        "success": st.column_config.NumberColumn(
            "success, re-measured", format="%.3f", help="the kept mask re-measured once on all the scan images of "
            "the other classes; it can be a little below the epoch's rate (measured on fewer images while the mask "
            "still moved)"),
        "mask_l1": st.column_config.NumberColumn("mask L1", format="%.1f", help="the kept mask's L1 norm; empty "
                                                 "when the class did not converge"),
        "anomaly_index": st.column_config.NumberColumn("anomaly index", format="%.2f"),
    })
    if result.epoch_success is None:
        st.caption("This stored scan predates the epoch-success record; scan again (other settings or after "
                   "clearing the store) to see it.")
if known is not None:
    st.subheader("The known trigger, for comparison")
    x0 = suspect.defense_pool.images(np.arange(1))
    c1, c2, c3 = st.columns([1, 1, 3])
    if known.sample_specific:  # the pool image's own trigger pixels, drawn on it
        c1.image(footprint_tile(known.footprints(x0)[0].numpy(), image=x0[0].numpy(), scale=3),
                 caption="this pool image's own trigger pixels in red (the trigger differs per image)")
    else:
        c1.image(footprint_tile(known.footprint().numpy(), scale=3), caption="known trigger's footprint: the pixels "
                 "it changes in red")
    c2.image(framed(to_display(known(x0)[0], 3) if x0.shape[1] == 3 else
                    np.repeat(to_display(known(x0)[0], 3)[..., None], 3, axis=2), 12),
             caption=f"a pool image with the known {known.name} trigger")

st.subheader("Use a recovered trigger")
st.markdown("Adopting a recovered trigger saves a copy of this suspect that uses it: every view (Grad-CAM, "
            "activations, feature space, skip ablation) and every defense that needs triggered inputs then works "
            "with it, and each page says that the trigger is **recovered**, not known.")
c1, c2 = st.columns([2, 1])
target = c1.selectbox("Class", range(len(classes)), index=top, format_func=lambda k: names[k]
                      + (" (flagged)" if k in result.flagged else ""), key="adopt_class")
if c2.button("Adopt this trigger", key="adopt_go"):
    folder = save_recovered_suspect(suspect, result, int(target), root, parent=ref)
    st.session_state["suspect"] = str(folder)
    st.rerun()
