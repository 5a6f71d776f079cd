"""Feature-space page: penultimate features in 2-D (PCA at once, UMAP on demand), poisoned points marked."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.features import embed, feature_set, separation_score
from analysis.figures import embedding_figure
from dashboard.common import (
    StreamlitProgress,
    load_suspect,
    memoized,
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

st.title("Feature space: do poisoned inputs form their own cluster?")
model_line(ref)
trigger_notice(suspect)
stop_unless_applicable(suspect, ("module_hooks", "linear_head"), "Feature space")
st.markdown(
    "Each point is one image, placed by the model's penultimate-layer features. In a backdoored model triggered "
    "inputs and poisoned training samples gather in a tight cluster of their own, apart from the genuine images of "
    "the target class: the observation behind activation clustering (Chen et al., 2019) and the reason DBD "
    "(Huang et al., ICLR 2022) learns features without labels first. **Lasso** points to see their images."
)


picked = pick_trigger(ref, suspect, "emb_trigger_from")
trigger_ref = picked[0] if picked is not None else None
all_to_all = picked is not None and picked[1] is not None and picked[1].mapping == "all-to-all"
if picked is None:
    st.info("No trigger is known for this suspect (and no demo suspect's trigger fits its data), so only **clean** "
            "points are shown: triggered copies need a trigger to stamp, and the poisoned training samples a known "
            "attack. Recover a trigger on the Detection page and adopt it to see where triggered inputs land.",
            icon=":material/info:")


@st.cache_data(show_spinner="Extracting features ...", max_entries=8)
def cached_features(ref: str, trigger_ref: str | None, n: int, seed: int = 0):
    """Features of model ``ref``; triggered copies carry the trigger of suspect ``trigger_ref`` (None: none)."""
    s, lk = load_suspect(ref)
    trig = load_suspect(trigger_ref)[0].trigger if trigger_ref is not None else None
    with lk:
        return feature_set(s, n_clean=n, n_triggered=n // 2 if trig is not None else 0, n_train=n // 2, seed=seed,
                           trigger=None if trigger_ref == ref else trig)


n = sample_size()
fs = cached_features(ref, trigger_ref, n)
c1, c2 = st.columns([1, 3])
method = c1.radio("Embedding", ["PCA", "UMAP"], key="emb_method",
                  help="PCA is instant; UMAP (umap-learn, fixed seed) is computed once per suspect and sample size.")
n_neighbors = c1.slider("UMAP neighbours", 5, 50, 15, key="emb_nn", disabled=method != "UMAP")
if method == "PCA":
    embedding = embed(fs, "PCA")
else:
    bar = StreamlitProgress("UMAP")
    embedding = memoized("umap", (ref, trigger_ref, n, n_neighbors),
                         lambda: embed(fs, "UMAP", n_neighbors=n_neighbors, progress=bar), max_entries=8)
    bar.done()

colour = c1.radio("Colour by", ["clean / triggered / poisoned", "class"], key="emb_colour", horizontal=True,
                  help="the symbol always shows the kind of point; colour by class to see the target class")
classes = suspect.classes
fig = embedding_figure({suspect.name: embedding}, classes, lasso=True,
                       color_by="class" if colour == "class" else "kind")
with c2:
    event = st.plotly_chart(fig, key="feature_scatter", on_select="rerun", selection_mode=("lasso", "box", "points"))

sep = separation_score(embedding.points, fs.poisoned)
sep_full = embedding.separation
counts = pd.Series(fs.kind).value_counts()
m = c1.container()
if sep["n_poisoned"]:
    m.metric("Poisoned-cluster separation (2-D)", f"{sep['score']:.2f}", help=(
        f"mean share of each poisoned point's {sep['k']} nearest neighbours that are poisoned; chance "
        f"{sep['chance']:.2f}"))
    m.metric("Separation in full feature space", f"{sep_full['score']:.2f}",
             help="the same score on the penultimate features themselves")
    m.caption(f"Chance level {sep['chance']:.2f} (the poisoned share of all points). Poisoned = triggered test "
              "images and poisoned training samples.")
    if all_to_all:
        m.caption(f"All-to-all attack: a triggered image of class y goes to class (y + 1) mod {suspect.num_classes}, "
                  "so poisoned points may gather beside every class rather than in one cluster at one target.")
    if trigger_ref not in (None, ref):
        m.caption("No poisoned training samples: they belong to a suspect's own attack, and this model was not "
                  "trained on the chosen trigger's.")
m.caption(" · ".join(f"{k}: {v}" for k, v in counts.items()))


def selected_indices(ev) -> list[int]:
    """Global point indices from a plotly selection; the browser sends customdata as {"0": i}, AppTest as [i]."""
    try:
        points = ev.selection.points if hasattr(ev, "selection") else ev["selection"]["points"]
    except (KeyError, TypeError, AttributeError):
        return []
    out = []
    for p in points:
        cd = p.get("customdata")
        if isinstance(cd, dict):
            cd = cd.get("0", next(iter(cd.values()), None))
        elif isinstance(cd, (list, tuple)):
            cd = cd[0] if cd else None
        if cd is not None:
            out.append(int(cd))
    return sorted(set(out))


chosen = selected_indices(event)
st.subheader("Selected points")
if not chosen:
    st.caption("Draw a lasso (or a box) around points in the scatter to see their images and predictions here.")
else:
    picked = pd.Series([classes[int(c)] for c in fs.label[chosen]])
    st.write(f"{len(chosen)} points selected: {int(fs.poisoned[chosen].sum())} poisoned; classes "
             + ", ".join(f"{k} ({v})" for k, v in picked.value_counts().items()))
    show = chosen[:24]
    cols = st.columns(8)
    for k, i in enumerate(show):
        cols[k % 8].image(to_display(fs.images[i], 3), caption=f"{fs.kind[i]} · true {classes[int(fs.label[i])]} · "
                                                              f"pred {classes[int(fs.pred[i])]}")
    if len(chosen) > len(show):
        st.caption(f"showing the first {len(show)} of {len(chosen)}")
