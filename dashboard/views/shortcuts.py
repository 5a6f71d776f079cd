"""Skip-connection ablation page: BA and ASR as each residual block's skip output is scaled down."""

from __future__ import annotations

import streamlit as st

from analysis.figures import ablation_figure
from analysis.shortcuts import DEFAULT_GAMMAS, NoSkipConnectionsError, ablation_curves, ablation_seconds
from dashboard.common import (
    StreamlitProgress,
    load_suspect,
    memo_get,
    memoized,
    model_line,
    sample_size,
    sidebar,
    stop_unless_applicable,
    trigger_notice,
)
from dashboard.signs import delta_color, delta_points
from dashboard.trigger_source import pick_trigger
from suspects.metrics import asr_rule
from suspects.models import list_residual_blocks

ref = sidebar()
suspect, lock = load_suspect(ref)

st.title("Skip-connection ablation")
model_line(ref)
trigger_notice(suspect)
st.markdown(
    "Every residual block computes residual(x) + γ·skip(x). Scaling one block's skip output down (γ from 1 to 0) "
    "and re-measuring BA and ASR shows where the trigger travels: Yang et al. (*Backdoor Defense via Suppressing "
    "Model Shortcuts*, ICASSP 2023) found that backdoors ride on a few key skip connections, where ASR collapses "
    "while BA falls more gently. Their rule picks the **critical block**: the largest rise of ASR between "
    "neighbouring γ, discounted by exp(ASR) before the rise."
)

stop_unless_applicable(suspect, ("module_hooks", "residual_blocks"), "Skip-connection ablation")
picked = pick_trigger(ref, suspect, "abl_trigger_from")
if picked is None:
    st.info("No trigger is known for this suspect and no demo suspect's trigger fits its data: ASR, and so this "
            "view, needs one. Recover one on the Detection page and adopt it.")
    st.stop()
trigger_ref, trigger = picked


def ablation(ref: str, trigger_ref: str, n: int, gammas: tuple[float, ...], progress: StreamlitProgress):
    """The ablation of model ``ref`` with the trigger of suspect ``trigger_ref``."""
    s, lk = load_suspect(ref)
    trig = load_suspect(trigger_ref)[0].trigger
    with lk:
        return ablation_curves(s.model, s.test, trig, n, gammas, progress=progress)


n = sample_size()
key = (ref, trigger_ref, n, DEFAULT_GAMMAS)
res = memo_get("skip_ablation", key)
if res is None:
    with lock:
        eta = ablation_seconds(suspect.model, suspect.input_shape, n)
    st.info(f"The ablation re-measures BA and ASR for {len(list_residual_blocks(suspect.model))} blocks × "
            f"{len(DEFAULT_GAMMAS) - 1} values of γ on {n} clean + {n} triggered images: about "
            f"**{max(1, round(eta))} s** here. Its result is kept and shown at once next time.")
    if not st.button(f"Run the ablation (about {max(1, round(eta))} s)", key="run_ablation", type="primary",
                     icon=":material/play_arrow:"):
        st.stop()
    bar = StreamlitProgress(f"Ablating every block on {n} clean + {n} triggered images")
    try:
        res = memoized("skip_ablation", key, lambda: ablation(ref, trigger_ref, n, DEFAULT_GAMMAS, bar))
    except NoSkipConnectionsError as err:
        bar.done()
        st.info(str(err))
        st.stop()
    bar.done()

st.plotly_chart(ablation_figure({suspect.name: res}), key="ablation_curves")
st.caption(f"{res.n_clean} clean and {res.n_triggered} triggered test images ("
           + asr_rule(trigger) + ", as for the ASR). γ = 1 is the unmodified model; the x axis runs from 1 down to 0.")

c1, c2 = st.columns([1, 2])
c1.metric("Critical block", res.critical_block or "none", help="argmax over blocks of max_i (ASR(γ_i) − ASR(γ_{i−1})) "
          f"/ exp(ASR(γ_{{i−1}})), γ ascending; none when no score exceeds {res.min_score}")
if res.critical_block is None:
    c1.caption(res.no_critical_reason() + ".")
else:
    eff = res.switched_off()
    if eff is not None:
        a, b = c1.columns(2)
        a.metric("ASR with that block off (γ = 0)", f"{100 * eff['asr_after']:.1f}%",
                 delta=delta_points(eff["asr_before"], eff["asr_after"], "vs. γ = 1"), delta_color=delta_color("asr"),
                 help="attack success rate with the block's skip output scaled to 0; the change is against the "
                      "unmodified model (γ = 1)")
        b.metric("BA with that block off (γ = 0)", f"{100 * eff['ba_after']:.1f}%",
                 delta=delta_points(eff["ba_before"], eff["ba_after"], "vs. γ = 1"), delta_color=delta_color("ba"),
                 help="clean accuracy with the block's skip output scaled to 0; the change is against the "
                      "unmodified model (γ = 1)")
    note = res.critical_block_note()
    if note:
        c1.warning(note, icon=":material/warning:")
scores = {b: round(v, 3) for b, v in sorted(res.scores.items(), key=lambda kv: -kv[1])}
c2.dataframe({"block": list(scores), "critical-block score": list(scores.values())}, hide_index=True)
with st.expander("Full table"):
    st.dataframe(res.table.style.format({"ba": "{:.3f}", "asr": "{:.3f}", "gamma": "{:.1f}"}), hide_index=True)
