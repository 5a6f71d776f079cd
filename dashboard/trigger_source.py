"""Whose trigger a page stamps on its images: the suspect's own, or another suspect's known trigger, so a clean model
can be looked at under the trigger of a backdoored one (README's tour, step 2). UI only."""

from __future__ import annotations

import streamlit as st

import suspects
from runs import uploads
from suspects.store import DEMO_SUSPECTS, list_demo_suspects
from suspects.triggers import Trigger, trigger_from_spec

__all__ = ["OWN", "trigger_sources", "pick_trigger", "remember_trigger_source"]

OWN = "own"  # the key of the suspect's own trigger among the sources
_LAST = "_last_trigger_source"  # the last suspect whose own trigger a page used (a clean model then defaults to it)


def trigger_sources(ref: str, suspect: suspects.Suspect) -> dict[str, str]:
    """Source -> label: the suspect's own trigger first (when it has one), then every demo suspect with a known
    trigger on the same data, input shape and classes (its target class must exist in this model)."""
    out: dict[str, str] = {}
    own = suspect.trigger
    if own is not None:
        out[OWN] = f"its own ({'recovered' if own.name == 'recovered' else own.name})"
    for name in list_demo_suspects():
        other = f"demo:{name}"
        if other == ref:
            continue
        card = uploads.read_card(DEMO_SUSPECTS / name) or {}
        spec = card.get("trigger")
        if (spec and card.get("data") == suspect.card.get("data")
                and list(card.get("input_shape", [])) == list(suspect.input_shape)
                and len(card.get("classes", [])) == suspect.num_classes):
            out[other] = f"{name} (demo): {spec.get('name')}, " + (
                "all-to-all" if spec.get("mapping") == "all-to-all" else f"target class {spec.get('target', 0)}")
    return out


def source_trigger(source: str, ref: str, suspect: suspects.Suspect) -> Trigger | None:
    """The trigger of ``source`` (:data:`OWN` or a demo suspect reference), built for ``suspect``'s input shape."""
    if source == OWN:
        return suspect.trigger
    card = uploads.read_card(DEMO_SUSPECTS / source.removeprefix("demo:")) or {}
    spec = card.get("trigger")
    return trigger_from_spec(spec, suspect.input_shape, suspect.num_classes) if spec else None


def remember_trigger_source(ref: str) -> None:
    """Note that the pages showed ``ref`` with its own trigger: a clean model picked next defaults to that one."""
    if ref.startswith("demo:"):
        st.session_state[_LAST] = ref


def default_source(sources: dict[str, str]) -> str:
    """The suspect's own trigger; for a model without one, the trigger of the backdoored suspect viewed last, else
    the BadNets demo's, else the first."""
    if OWN in sources:
        return OWN
    last = st.session_state.get(_LAST)
    if last in sources:
        return last
    return "demo:badnets" if "demo:badnets" in sources else next(iter(sources))


def pick_trigger(ref: str, suspect: suspects.Suspect, key: str, container=None) -> tuple[str, Trigger] | None:
    """A "Trigger from" selector (in ``container``, default the page): returns the chosen source's reference (``ref``
    itself for the own trigger) and its trigger, or None when no trigger fits this suspect (the page then says so).
    A model without a trigger of its own gets an explanation of whose trigger it is shown under."""
    sources = trigger_sources(ref, suspect)
    if not sources:
        return None
    where = container or st
    options = list(sources)
    first = default_source(sources)
    source = where.selectbox("Trigger from", options, index=options.index(first), format_func=sources.get,
                             key=f"{key}:{ref}", help="whose trigger is stamped on the images: this suspect's own, or "
                             "another demo suspect's known trigger (same data), to see how a model without that "
                             "backdoor reacts to it")
    if source == OWN:
        remember_trigger_source(ref)
        return ref, suspect.trigger
    if suspect.trigger is None:
        st.info(f"No trigger is known for this suspect, so its images are stamped with the trigger of "
                f"**{source.removeprefix('demo:')} (demo)** (change it under *Trigger from*): a model without that "
                "backdoor should hardly react to it.", icon=":material/swap_horiz:")
    return source, source_trigger(source, ref, suspect)
