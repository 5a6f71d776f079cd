"""Shared dashboard plumbing: which suspect is selected, cached loading, device. UI only, no algorithms."""

from __future__ import annotations

import os
import threading

import streamlit as st
import torch

import suspects
from suspects.device import describe_device, pick_device
from suspects.store import list_demo_suspects

DEFAULT_SUSPECT = "demo:badnets"


def suspect_choices() -> list[str]:
    """Every suspect the picker offers: the bundled demos (later issues add the run store)."""
    return [f"demo:{name}" for name in list_demo_suspects()]


@st.cache_resource(show_spinner="Loading suspect ...")
def load_suspect(ref: str) -> tuple[suspects.Suspect, threading.Lock]:
    """One shared model per suspect reference, with a lock: hooks (Grad-CAM) must not interleave."""
    return suspects.load(ref), threading.Lock()


@st.cache_resource
def device() -> torch.device:
    return pick_device(os.environ.get("BACKDOOR_LENS_DEVICE"))


def selected_ref() -> str:
    """The selected suspect, kept in session state and in the query params so a reload keeps it."""
    choices = suspect_choices()
    ref = st.session_state.get("suspect") or st.query_params.get("suspect") \
        or os.environ.get("BACKDOOR_LENS_SUSPECT") or DEFAULT_SUSPECT
    if ref not in choices and choices:
        ref = DEFAULT_SUSPECT if DEFAULT_SUSPECT in choices else choices[0]
    return ref


def sidebar() -> str:
    """Draw the sidebar (suspect picker, device) and return the selected suspect reference."""
    choices = suspect_choices()
    ref = selected_ref()
    with st.sidebar:
        st.markdown("### Suspect")
        if not choices:
            st.error("No demo suspects found under assets/demo/suspects.")
            st.stop()
        picked = st.selectbox("Model under investigation", choices, index=choices.index(ref), key="suspect_picker",
                              help="Bundled demo suspects trained on a Fashion-MNIST subset")
        st.session_state["suspect"] = picked
        st.query_params["suspect"] = picked
        st.caption(f"Device: **{describe_device(device())}**")
    return picked
