"""Overview: the suspect's card, its BA / ASR / RA with their definitions, clean vs. triggered examples."""

from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from dashboard.common import device, load_suspect, model_line, sidebar, trigger_notice
from dashboard.paths import to_url
from suspects.metrics import metric_definitions, predict
from suspects.store import normalization_label


def run_report(ref: str) -> dict:
    """The defense run's report.json beside a repaired model's card (empty when it is not there)."""
    import json
    from pathlib import Path

    try:
        out = json.loads((Path(ref) / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


ref = sidebar()
suspect, lock = load_suspect(ref)
card = suspect.card

st.title(f"Suspect: {suspect.name}")
model_line(ref)
trigger_notice(suspect)
st.markdown(
    "A **suspect** is a classifier that may carry a backdoor: it behaves normally on clean inputs but sends "
    "inputs stamped with a secret *trigger* to the attacker's class (Gu et al., *BadNets*, 2017). "
    "This page shows what is known about it and how often the trigger works."
)

MEASURE_LIMIT = 2000


@st.cache_data(show_spinner="Measuring BA / ASR on the test split ...", max_entries=16)
def measured_metrics(ref: str) -> dict:
    """BA / ASR / RA of a suspect whose card holds none (an upload, a checkpoint), on its first test images."""
    from suspects.metrics import evaluate_subset

    s, lk = load_suspect(ref)
    with lk:
        m = evaluate_subset(s.model, s.test, s.trigger, MEASURE_LIMIT, device=device())
    return {**m.to_dict(), "evaluated_on": f"{m.n_clean} random test images, measured when the model was opened"}


metrics = card.get("metrics") or {}
if not metrics.get("ba") and card.get("data"):
    try:
        metrics = measured_metrics(ref)
    except Exception as err:  # noqa: BLE001 - a missing data source: the card is still shown
        st.warning(f"BA / ASR could not be measured: {getattr(err, 'summary', None) or err}")
cols = st.columns(3)
labels = {"ba": "BA (benign accuracy)", "asr": "ASR (attack success rate)", "ra": "RA (robust accuracy)"}
definitions = metric_definitions(suspect.trigger)  # the ASR / RA set follows the attack's label mapping
for col, key in zip(cols, ("ba", "asr", "ra"), strict=True):
    value = metrics.get(key)
    col.metric(labels[key], "n/a" if value is None else f"{100 * value:.1f}%", help=definitions[key])
    col.caption(definitions[key])
st.caption(
    f"Measured on {metrics.get('n_clean', '?')} clean and {metrics.get('n_poisoned', '?')} triggered test images "
    f"({metrics.get('evaluated_on', 'test split')})."
)

trigger = suspect.trigger
left, right = st.columns([1, 1])
with left:
    st.subheader("Card")
    rows = {
        "architecture": f"{card.get('arch')} {card.get('arch_kwargs', {})}",
        "classes": ", ".join(suspect.classes),
        "input shape (C, H, W)": str(tuple(card.get("input_shape", []))),
        "data source": str(card.get("data")),
        "input normalisation": normalization_label(card),
        "attack": "none known" if trigger is None else
        (f"{trigger.name}, target {trigger.target} ({suspect.classes[trigger.target]}), {trigger.mapping}"
         if trigger.mapping == "all-to-one" else
         f"{trigger.name}, all-to-all: each class y goes to class (y + 1) mod {suspect.num_classes}"),
        "attack parameters": "—" if trigger is None else (
            f"recovered mask and pattern (L1 {float(trigger.mask.sum()):.1f}, "
            f"{(trigger.params.get('source') or {}).get('method', '?')})" if trigger.name == "recovered"
            else str(trigger.params)),
        "poisoned training samples": str((card.get("poison") or {}).get("n_poisoned", "—")),
        "provenance": str((card.get("provenance") or {}).get("source", "—")),
    }
    prov = card.get("provenance") or {}
    repaired = prov.get("source") == "defense"
    if repaired:  # a repaired model: the run that made it
        run = run_report(ref)
        params = run.get("params", prov.get("params")) or {}
        rows["provenance"] = f"repaired by {run.get('title') or prov.get('defense')} (defense run)"
        rows["defense run"] = (f"{prov.get('defense')}, preset {prov.get('preset', run.get('preset', '?'))}, seed "
                               f"{run.get('seed', '?')}, pool {run.get('pool_size', '?')} images, finished "
                               f"{run.get('finished') or card.get('created', '?')}")
        rows["defense parameters"] = ", ".join(f"{k}={_num(v)}" for k, v in params.items()) or "—"
        rows["repaired from"] = to_url(str(prov.get("parent", "?")))  # a short name, never a server path
    elif prov.get("source") == "upload":
        rows["provenance"] = f"upload of {prov.get('file', '?')}"
    st.table({"field": list(rows), "value": list(rows.values())})
with right:
    st.subheader("Training history" + (" (of the original suspect)" if repaired else ""))
    hist = (card.get("training") or {}).get("history") or []
    if hist and repaired:
        st.caption(f"Inherited: this is how **{prov.get('parent', 'the original suspect')}** was trained, before "
                   f"{prov.get('defense', 'the defense')} repaired it. The repaired model's own BA / ASR / RA are "
                   "the numbers above.")
    if hist:
        import pandas as pd

        df = pd.DataFrame(hist).set_index("epoch")[[c for c in ("ba", "asr") if c in hist[0]]]
        st.line_chart(df, height=260, x_label="training epoch", y_label="share of test images")
        st.caption("BA and ASR on the test split after each training epoch (reported, never used for selection).")
    else:
        st.info("No training history recorded for this suspect.")

st.subheader("Clean vs. triggered examples")
n = st.slider("Examples", 4, 16, 8, step=4, key="n_examples")
test = suspect.test
mask = trigger.test_mask(test.labels) if trigger is not None else torch.ones(len(test), dtype=torch.bool)
idx = torch.nonzero(mask).flatten()[:: max(1, int(mask.sum()) // n)][:n]
x = test.images(idx)
with lock:
    pred_clean = predict(suspect.model, x, device=device())
    xt = trigger(x) if trigger is not None else None
    pred_trig = predict(suspect.model, xt, device=device()) if xt is not None else None


def to_img(t: torch.Tensor) -> np.ndarray:
    arr = t.clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


grid = st.columns(n)
classes = suspect.classes
for j, col in enumerate(grid):
    true = classes[int(test.labels[idx[j]])]
    col.image(to_img(x[j]), caption=f"clean · true {true} · pred {classes[int(pred_clean[j])]}", width="stretch")
    if xt is not None:
        col.image(to_img(xt[j]), caption=f"triggered · pred {classes[int(pred_trig[j])]}", width="stretch")
if trigger is None:
    st.info("No trigger is known for this suspect, so only clean inputs are shown.")
