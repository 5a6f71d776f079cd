"""Backdoor Lens dashboard entry point: ``backdoor-lens serve`` runs ``streamlit run dashboard/app.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

st.set_page_config(page_title="Backdoor Lens", page_icon=":material/search:", layout="wide")

PAGES = Path(__file__).resolve().parent / "pages"
nav = st.navigation([
    st.Page(str(PAGES / "overview.py"), title="Overview", icon=":material/info:", default=True),
])
nav.run()
