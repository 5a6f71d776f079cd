"""Shared dashboard plumbing: the selected suspect, cached loading, device, images. UI only, no algorithms."""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

import numpy as np
import streamlit as st
import torch

import suspects
from analysis.gradcam import cam_overlay
from dashboard.paths import from_url, to_url
from runs import uploads
from runs.identity import run_of_folder
from runs.store import RunStore, runs_root
from runs.timing import eta_text
from suspects.data import DatasetNotFoundError, list_sources
from suspects.device import apply_cpu_threads, describe_device, pick_device, prepare_model
from suspects.models import list_models
from suspects.store import DEMO_SUSPECTS, SuspectLoadError, list_demo_suspects
from suspects.triggers import MAPPINGS, list_triggers

DEFAULT_SUSPECT = "demo:badnets"
UPLOAD_LIMIT_MB = uploads.UPLOAD_LIMIT_MB
MAPPING_LABELS = {"all-to-one": "all-to-one (one target class)", "all-to-all": "all-to-all (y → y + 1 mod K)"}

# the dashboard computes with one CPU thread; its background worker takes the other cores (issue 12.4)
apply_cpu_threads("ui")


@st.cache_resource
def run_store(root: str) -> RunStore:
    """One RunStore per root, shared by all sessions; interrupted runs are marked once at server start."""
    store = RunStore(root)
    store.reconcile()
    return store


def store() -> RunStore:
    return run_store(str(runs_root()))


def stored_suspects() -> list[str]:
    """Repaired models of finished runs (complete on disk), then recovered, uploaded and imported (BackdoorBench)
    suspects; newest first."""
    root = runs_root()
    if not (root / "index.sqlite").exists():
        return uploads.stored_suspects(root)
    return uploads.stored_suspects(root, store())


def zoo_suspects() -> list[str]:
    """``zoo:NAME`` of every built zoo suspect but the seed-0 test ones (they are the demos, listed as such)."""
    from suspects.zoo import default_zoo

    try:
        zoo = default_zoo()
        return [e.ref for e in zoo.entries() if not e.bundle and zoo.present(e)]
    except (SuspectLoadError, ValueError, OSError):  # no readable manifest: no zoo in the picker
        return []


def suspect_choices() -> list[str]:
    """Every suspect the picker offers: the bundled demos, the built zoo suspects, then the run store."""
    return [f"demo:{name}" for name in list_demo_suspects()] + zoo_suspects() + stored_suspects()


def label_of(ref: str) -> str:
    if ref.startswith("demo:"):
        return f"{ref[5:]} (demo)"
    if ref.startswith("zoo:"):
        return f"{ref[4:]} (zoo, {'development' if '-dev-' in ref else 'test'})"
    p = Path(ref)
    try:
        rel = p.relative_to(runs_root())
    except ValueError:
        return str(p)
    run_id = run_of_folder(p) if len(rel.parts) == 1 else None
    if run_id is not None:  # the run's own tag first, so two runs of one defense never look alike when cut short
        when = re.match(r"(\d{4})(\d\d)(\d\d)-(\d\d)(\d\d)", run_id)
        stamp = f" ({'-'.join(when.groups()[:3])} {':'.join(when.groups()[3:])})" if when else ""
        return f"{uploads.card_name(p, rel.name)} · run {run_id.rsplit('-', 1)[-1]}{stamp}"
    return f"{uploads.card_name(p, rel.name)} · {rel} (run store)"


@st.cache_resource(show_spinner="Loading suspect ...", max_entries=8)
def _load_suspect(ref: str) -> tuple[suspects.Suspect, threading.Lock]:
    suspect = suspects.load(ref)
    suspect.model = prepare_model(suspect.model, device()).eval()
    return suspect, threading.Lock()


def load_suspect(ref: str) -> tuple[suspects.Suspect, threading.Lock]:
    """One shared model per suspect reference, with a lock: hooks (Grad-CAM, activations) must not interleave.
    A suspect that cannot be loaded (a damaged folder, a bad checkpoint) stops the page with one line and its
    details in an expander; the sidebar stays usable."""
    try:
        return _load_suspect(ref)
    except SuspectLoadError as err:
        load_error(err)
        st.stop()
        raise  # not reached: st.stop() raises


@st.cache_resource
def device() -> torch.device:
    return pick_device(os.environ.get("BACKDOOR_LENS_DEVICE"))


def selected_ref() -> str:
    """The selected suspect, kept in session state and in the query params so a reload keeps it."""
    choices = suspect_choices()
    ref = st.session_state.get("suspect") or from_url(st.query_params.get("suspect"), choices) \
        or os.environ.get("BACKDOOR_LENS_SUSPECT") or DEFAULT_SUSPECT
    if ref not in choices and choices:
        ref = DEFAULT_SUSPECT if DEFAULT_SUSPECT in choices else choices[0]
    return ref


def _picker_key() -> str:
    """The picker's widget key. It changes whenever the suspect is chosen elsewhere (a page's "Open" button, an
    upload, Adopt, the URL), so the browser draws a fresh picker whose default is that suspect instead of keeping
    its old choice (issue 12 item 1)."""
    gen = int(st.session_state.get("_picker_gen", 0))
    return "suspect_picker" if gen == 0 else f"suspect_picker_{gen}"


def _on_pick(key: str) -> None:
    st.session_state["suspect"] = st.session_state[key]
    st.session_state["_picker_ref"] = st.session_state[key]


def load_error(err: Exception) -> None:
    """A loading error as one line, with the underlying details in an expander when there are any."""
    st.error(getattr(err, "summary", None) or str(err))
    details = getattr(err, "details", "")
    if details:
        with st.expander("Details"):
            st.code(details, language=None)


def upload_checkpoint(raw: bytes, filename: str, arch: str, data: str, width: int | None,
                      normalize: str | None = None, trigger: dict | None = None) -> str | None:
    """Save an uploaded checkpoint as a suspect and select it; returns its folder, or None after showing the error
    as one line (details in an expander). Width, input channels and class count are read off the weights unless
    ``width`` is given."""
    if len(raw) > UPLOAD_LIMIT_MB * 1024**2:
        st.error(f"{filename} is larger than {UPLOAD_LIMIT_MB} MB")
        return None
    try:
        folder, _ = uploads.save_upload(raw, filename, arch, data,
                                        arch_kwargs={"width": int(width)} if width else None, root=runs_root(),
                                        normalize=normalize, trigger=trigger)
    except DatasetNotFoundError as err:
        load_error(err)
        return None
    except SuspectLoadError as err:
        load_error(err)
        return None
    except Exception as err:  # noqa: BLE001 - whatever a hostile file does, the page stays up and says so in one line
        st.error(f"{filename}: could not be loaded ({type(err).__name__})")
        with st.expander("Details"):
            st.code(f"{type(err).__name__}: {err}", language=None)
        return None
    st.session_state["suspect"] = str(folder)
    return str(folder)


def _upload_form() -> None:
    with st.expander("Upload a checkpoint"):
        st.caption(f"A state dict (.safetensors, .pt, .pth; at most {UPLOAD_LIMIT_MB} MB). Nothing in it is executed: "
                   "pickles that ask for code are refused.")
        file = st.file_uploader("Checkpoint", type=["safetensors", "pt", "pth"], key="upload_file")
        other = "another library's: torchvision:NAME or timm:NAME"
        arch = st.selectbox("Architecture", [*list_models(), other], key="upload_arch")
        if arch == other:
            arch = st.text_input("Library architecture", "torchvision:resnet18", key="upload_arch_name",
                                 help="any torchvision classification model (torchvision:mobilenet_v3_small) or timm "
                                      "model (timm:vit_tiny_patch16_224); the file holds the library's key names")
            width = None
        else:
            width = st.number_input("Width (base channels)", 1, 512, None, key="upload_width",
                                    placeholder="from weights",
                                    help="leave empty: read off the weights (with input channels and class count)")
        data = st.selectbox("Measure on", list_sources()[:-1], key="upload_data",
                            help="the data source whose test split and classes the model uses")
        normalize = st.text_input("Input normalisation", "", key="upload_norm",
                                  placeholder="the data source's standard one",
                                  help="a name (imagenet, cifar10, mnist, fashion-mnist, demo, half, none) or "
                                       "per-channel means/stds as M1,...,Mc/S1,...,Sc; empty: the data source's "
                                       "standard one, shown as assumed on Overview")
        unknown = "unknown: detect it (Detection page)"
        attack = st.selectbox("Attack", [unknown, *list_triggers()], key="upload_attack",
                              help="the trigger, when known, so ASR can be measured; otherwise Neural Cleanse looks "
                                   "for one")
        trigger = None
        if attack != unknown:
            mapping = st.radio("Label mapping", MAPPINGS, key="upload_mapping", horizontal=True,
                               format_func=MAPPING_LABELS.get,
                               help="all-to-one: every triggered input goes to one target class; all-to-all: a "
                                    "triggered input of class y goes to class (y + 1) mod K (clean-label attacks "
                                    "such as SIG are all-to-one only)")
            target = (st.number_input("Target class", 0, 999, 0, key="upload_target")
                      if mapping == "all-to-one" else 0)
            trigger = {"name": attack, "target": int(target), "mapping": mapping, "params": {}}
        if file is not None and st.button("Load checkpoint", key="upload_go"):
            if upload_checkpoint(file.getvalue(), file.name, arch, data, width, normalize.strip() or None, trigger):
                st.rerun()


def sidebar() -> str:
    """Draw the sidebar (suspect picker, upload, sample size, device) and return the selected suspect reference."""
    choices = suspect_choices()
    if not choices:
        st.error(f"No suspects found: the demo bundle ({DEMO_SUSPECTS}) is missing.")
        st.stop()
    ref = selected_ref()
    st.session_state["suspect"] = ref
    if "_picker_ref" not in st.session_state:
        st.session_state["_picker_ref"] = ref
    elif st.session_state["_picker_ref"] != ref:  # chosen elsewhere: a fresh picker that shows it
        st.session_state["_picker_gen"] = int(st.session_state.get("_picker_gen", 0)) + 1
        st.session_state["_picker_ref"] = ref
    key = _picker_key()
    if key in st.session_state and st.session_state[key] != ref:  # a stale picker: draw a fresh one
        st.session_state["_picker_gen"] = int(st.session_state.get("_picker_gen", 0)) + 1
        key = _picker_key()
    with st.sidebar:
        st.markdown("### Suspect")
        # the default index, not the session state, carries the choice: a browser (or AppTest) that sends back a
        # widget's default would otherwise show the first suspect while the page analyses another
        st.selectbox("Model under investigation", choices, index=choices.index(ref), key=key, format_func=label_of,
                     on_change=_on_pick, args=(key,), help="Demo suspects are trained on a Fashion-MNIST subset; the run store "
                     "holds repaired models and uploads.")
        _upload_form()
        st.slider("Sample size (images per view)", 50, 2000, st.session_state.get("sample_size", 500), step=50,
                  key="sample_size", help="How many test images the analysis views use; larger is slower but steadier.")
        st.caption(f"Device: **{describe_device(device())}**")
    st.query_params["suspect"] = to_url(ref)  # no absolute server path in the URL
    return ref


def model_line(ref: str) -> None:
    """Under a page's title: the model this page analyses (always the picker's choice)."""
    st.caption(f"Model: **{label_of(ref)}**")


def sample_size() -> int:
    return int(st.session_state.get("sample_size", 500))


def to_display(x: torch.Tensor | np.ndarray, scale: int = 4) -> np.ndarray:
    """(C, H, W) [0, 1] tensor or uint8 array -> (H*scale, W*scale[, 3]) uint8 image for st.image."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    arr = arr.transpose(1, 2, 0)
    if scale > 1:
        arr = arr.repeat(scale, 0).repeat(scale, 1)
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


def overlay(x: torch.Tensor, cam: np.ndarray, scale: int = 4) -> np.ndarray:
    """Grad-CAM overlay (jet colour map at half weight) of a [0, 1] image, enlarged ``scale`` times."""
    return cam_overlay(x, cam, scale)


def reference_models(ref: str, suspect: suspects.Suspect) -> list[str]:
    """Clean models trained on the same data (no trigger), usable as a reference next to ``suspect``."""
    out = []
    for other in list_demo_suspects():
        oref = f"demo:{other}"
        if oref == ref:
            continue
        card = uploads.read_card(DEMO_SUSPECTS / other) or {}
        if not card.get("trigger") and card.get("data") == suspect.card.get("data") \
                and list(card.get("input_shape", [])) == list(suspect.input_shape):
            out.append(oref)
    return out


def trigger_notice(suspect: suspects.Suspect) -> None:
    """Say clearly when the suspect's trigger is a recovered one (Detection page), not the attacker's known one."""
    trig = suspect.trigger
    if trig is None or trig.name != "recovered":
        return
    src = trig.params.get("source") or {}
    true = suspect.card.get("true_trigger")
    st.warning(f"Trigger **recovered** by {src.get('method', 'reverse-engineering').replace('_', ' ').title()}, "
               f"not known: target class {trig.target} ({suspect.classes[trig.target]}), anomaly index "
               f"{src.get('anomaly_index', '?')}. Triggered inputs on this page are stamped with the recovered "
               "mask and pattern" + (f"; the attacker's own trigger ({true.get('name')}) is not used." if true else "."),
               icon=":material/troubleshoot:")


T = TypeVar("T")


class _Memo:
    """A small thread-safe LRU shared by every session of this server process."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.items: OrderedDict[Hashable, object] = OrderedDict()
        self.lock = threading.Lock()


@st.cache_resource
def _memo(name: str, max_entries: int) -> _Memo:
    return _Memo(max_entries)


def memoized(name: str, key: Hashable, compute: Callable[[], T], max_entries: int = 16) -> T:
    """``compute()`` once per ``key``, for long computations that draw a live :class:`StreamlitProgress`.

    ``st.cache_data`` replays the elements a cached function draws and refuses to touch a bar created outside
    it (``CacheReplayClosureError``), so results computed under a progress bar are kept here instead.
    """
    memo = _memo(name, max_entries)
    with memo.lock:
        if key in memo.items:
            memo.items.move_to_end(key)
            return memo.items[key]  # type: ignore[return-value]
    value = compute()
    with memo.lock:
        memo.items[key] = value
        while len(memo.items) > memo.max_entries:
            memo.items.popitem(last=False)
    return value


def memo_get(name: str, key: Hashable, max_entries: int = 16) -> object | None:
    """What :func:`memoized` holds for ``key`` (None when nothing yet): pages show it at once without computing."""
    memo = _memo(name, max_entries)
    with memo.lock:
        return memo.items.get(key)


class StreamlitProgress:
    """The library's ``progress(fraction, message, metrics)`` callback drawn as an ``st.progress`` bar, with the
    elapsed time and the time left ("elapsed 0:42, about 1:10 left")."""

    def __init__(self, label: str):
        self.bar = st.progress(0.0, text=label)
        self.label = label
        self.start = time.monotonic()

    def __call__(self, fraction: float, message: str, metrics: dict) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.bar.progress(fraction, text=f"{self.label}: {message} · {eta_text(fraction, time.monotonic() - self.start)}")

    def done(self) -> None:
        self.bar.empty()


def stop_unless_applicable(suspect: suspects.Suspect, needs: tuple[str, ...], view: str) -> None:
    """A view that needs what the model lacks says so ("not applicable to this model: ...") and stops the page."""
    from suspects.models import not_applicable_reason

    reason = not_applicable_reason(suspect.model, needs)
    if reason:
        st.info(f"{view}: {reason}.")
        st.stop()
