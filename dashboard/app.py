"""Backdoor Lens dashboard entry point: ``backdoor-lens serve`` runs ``streamlit run dashboard/app.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

st.set_page_config(page_title="Backdoor Lens", page_icon=":material/search:", layout="wide")

PAGES = Path(__file__).resolve().parent / "views"
nav = st.navigation({
    "Start": [st.Page(str(PAGES / "overview.py"), title="Overview", icon=":material/info:", default=True)],
    "Where the backdoor lives": [
        st.Page(str(PAGES / "detection.py"), title="Detection", icon=":material/troubleshoot:"),
        st.Page(str(PAGES / "gradcam.py"), title="Grad-CAM", icon=":material/visibility:"),
        st.Page(str(PAGES / "activations.py"), title="Activations", icon=":material/bar_chart:"),
        st.Page(str(PAGES / "features.py"), title="Feature space", icon=":material/scatter_plot:"),
        st.Page(str(PAGES / "shortcuts.py"), title="Skip ablation", icon=":material/alt_route:"),
        st.Page(str(PAGES / "screening.py"), title="Screen inputs", icon=":material/filter_alt:"),
    ],
    "Remove it": [
        st.Page(str(PAGES / "defenses.py"), title="Defenses", icon=":material/shield:"),
        st.Page(str(PAGES / "compare.py"), title="Compare", icon=":material/compare:"),
    ],
})
nav.run()
