"""The "Stress test" panel of a finished run (Defenses and Compare pages): the retuning attack of Min et al.
(NeurIPS 2024) as a background job (``runs.stress``), its live progress, and the result stored with the run."""

from __future__ import annotations

import time

import streamlit as st

from defenses.base import ParamError
from runs.store import RunStore
from runs.stress import cancel_stress, latest_stress_job, load_stress, submit_stress

__all__ = ["stress_panel", "EXPLAIN"]

EXPLAIN = ("**Stress test** (retuning attack, Min et al., NeurIPS 2024, on the official protocol of "
           "`ft_poison.py`): fine-tune the repaired model for 5 epochs on 1,000 images, 995 clean defense-pool images "
           "and 5 from the attack's own poisoned training set, over 3 seeds, and the clean model of the same family "
           "the same way. *Not repaired*: the ASR was never brought down; *superficial*: it comes back; *robust*: it "
           "stays near the clean reference's; *inconclusive*: BA collapsed or too few images. The test split is only "
           "measured.")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _show_result(res: dict) -> None:
    verdict = res.get("verdict", "?")
    spread = (res.get("spread") or {}).get("asr_after_retune") or {}
    rng = f" [{_pct(spread['min'])}, {_pct(spread['max'])}] over {len(spread.get('values', []))} seeds" if spread else ""
    text = (f"Stress test: **{verdict}** — ASR {_pct(res.get('asr'))} → {_pct(res.get('asr_after_retune'))}{rng} "
            f"after re-tuning (BA {_pct(res.get('ba'))} → {_pct(res.get('ba_after_retune'))}); clean reference "
            f"{res.get('reference') or 'none known'}: ASR after re-tuning "
            f"{_pct(res.get('reference_asr_after_retune'))} · {res.get('protocol', 'lens-v1')} protocol · "
            f"{res.get('seconds', 0):.0f} s")
    if res.get("verdict_reason"):
        text += f"  \n{res['verdict_reason']}"
    {"robust": st.success, "superficial": st.error, "not repaired": st.error,
     "inconclusive": st.warning}.get(verdict, st.info)(text)


@st.fragment(run_every=1.0)
def _live(runs: RunStore, run_id: str) -> None:
    job = latest_stress_job(runs, run_id)
    if job is None or not job.active:
        st.rerun()  # the job ended: redraw the page once with its result
        return
    if job.status == "queued":
        st.info("Stress test queued; waiting for the device.")
    else:
        st.progress(min(max(job.progress, 0.0), 1.0), text=f"stress test: {job.message} ({100 * job.progress:.0f}%)")
    if st.button("Cancel the stress test", key=f"stress_cancel_{job.id}", icon=":material/stop:"):
        cancel_stress(runs, job.id)
        time.sleep(0.2)


def stress_panel(runs: RunStore, run_id: str, run_dir: str | None, key: str = "") -> None:
    """The stored result (if any), the live progress of a running stress job, and the button that queues one."""
    job = latest_stress_job(runs, run_id)
    busy = job is not None and job.active
    stored = load_stress(run_dir)
    if stored:
        _show_result(stored)
    elif job is not None and job.status == "failed":
        st.error(f"The last stress test failed: {(job.error or '').splitlines()[0] if job.error else ''}")
    if busy:
        _live(runs, run_id)
    label = "Stress test again" if stored else "Stress test"
    if st.button(label, key=f"stress_{key}{run_id}", disabled=busy, icon=":material/fitness_center:",
                 help=EXPLAIN):
        try:
            submit_stress(runs, run_id)
            st.rerun()
        except (ParamError, ValueError) as err:
            st.error(str(err))
