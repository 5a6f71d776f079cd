"""Input screening over the suspect zoo: fill docs/screening-grid.json (suspect x method) cell by cell (resumable),
and write the measured block of docs/screening.md from it.

    python scripts/screening_doc.py                  # rewrite the block of docs/screening.md from the store only
    python scripts/screening_doc.py --check          # exit 1 when the block is not what the store gives
    python scripts/screening_doc.py run [--attacks badnets] [--methods strip] [--minutes 30]

The grid is every backdoored test suspect of the zoo (``assets/zoo.json``: 3 training seeds per attack; seed 0 is
the demo bundle's) x every built-in screening method at its ``quick`` preset: one full screen each (calibrated on
the suspect's clean defense pool at a 5% target FPR, scored on its clean test images and their triggered copies).
A cell records the fingerprint of the weights it screened; one whose weights or method parameters changed since is
stale and ``run`` redoes it. The block gives per attack and method the AUROC's median and range over the suspects,
the TPR at the pool-chosen threshold and the FPR observed on clean test images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

STORE = ROOT / "docs" / "screening-grid.json"
DOC = ROOT / "docs" / "screening.md"
BLOCK = "screening"
SCRIPT = "scripts/screening_doc.py"
METHODS = ("strip", "scale-up", "ibd-psc")
"""The built-in screening methods (plugins are left out of the published page)."""
PRESET = "quick"
FPR = 0.05


def method_params(method: str) -> dict[str, Any]:
    import json
    from dataclasses import asdict, is_dataclass

    from analysis.screening import get_screener

    params = get_screener(method).make_params(PRESET)
    return json.loads(json.dumps(asdict(params) if is_dataclass(params) else dict(params), default=str))


def grid(attacks: list[str] | None = None, methods: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(attack, zoo reference, method) of every backdoored test suspect and method, built or not."""
    from suspects.zoo import default_zoo

    zoo = default_zoo()
    names = [a for a in zoo.manifest["attacks"] if a != "clean"]
    if attacks:
        names = [a for a in attacks if a in names] + [a for a in names if a not in attacks]
    ms = list(METHODS)
    if methods:
        ms = [m for m in methods if m in ms] + [m for m in ms if m not in methods]
    return [(a, e.ref, m) for a in names for e in zoo.entries("test", a) for m in ms]


def key(ref: str, method: str) -> str:
    return f"{ref}|{method}"


def cell_state(store: dict[str, Any], ref: str, method: str, fingerprint: str | set[str] | None) -> str:
    """``measured``, ``stale`` (the weights or the method's parameters changed since) or ``missing``. ``fingerprint``:
    the suspect's weights (one, or every build's: :func:`suspects.zoo.known_fingerprints`); None: not checked."""
    cell = store["cells"].get(key(ref, method))
    if cell is None:
        return "missing"
    known = {fingerprint} if isinstance(fingerprint, str) else set(fingerprint or ())
    if cell.get("params") != method_params(method) or (known and cell.get("fingerprint") not in known):
        return "stale"
    return "measured"


def run_cell(store: dict[str, Any], attack: str, ref: str, method: str, suspect: Any = None) -> dict[str, Any]:
    """One full screen of ``ref``'s test split with ``method``; store and return the cell."""
    import suspects
    from analysis.screening import screen_suspect
    from runs.pages import machine_line, today
    from suspects.identity import fingerprint

    suspect = suspect if suspect is not None else suspects.load(ref)
    t0 = time.time()
    r = screen_suspect(suspect, method, preset=PRESET, fpr=FPR)
    cell = {"attack": attack, "ref": ref, "method": method, "fingerprint": fingerprint(suspect),
            "params": method_params(method), "preset": PRESET, "fpr_target": FPR,
            "auroc": None if r.auroc is None else round(float(r.auroc), 4),
            "tpr": None if r.tpr_at_fpr is None else round(float(r.tpr_at_fpr), 4), "fpr": round(float(r.fpr), 4),
            "n_pool": r.n_pool, "n_clean": r.n_clean, "n_triggered": r.n_triggered,
            "seconds": round(time.time() - t0, 1), "machine": machine_line(), "measured": today()}
    store["cells"][key(ref, method)] = cell
    return cell


def fill(store: dict[str, Any], attacks: list[str] | None, methods: list[str] | None, minutes: float) -> int:
    import suspects
    from runs.pages import save_store
    from suspects.zoo import default_zoo

    zoo = default_zoo()
    deadline, done = time.time() + 60 * minutes, 0
    loaded: dict[str, Any] = {}
    for attack, ref, method in grid(attacks, methods):
        if time.time() > deadline:
            break
        if not zoo.present(zoo.entry(ref)):
            print(f"{ref}: not built (backdoor-lens zoo build --only {ref[4:]}); skipped", flush=True)
            continue
        if cell_state(store, ref, method, zoo.known_fingerprints(zoo.entry(ref))) == "measured":
            continue  # measured on this build or another build of the suspect
        if ref not in loaded:
            loaded.clear()
            loaded[ref] = suspects.load(ref)
        suspect = loaded[ref]
        print(f"screening {ref} with {method} ...", flush=True)
        c = run_cell(store, attack, ref, method, suspect)
        save_store(store, STORE)
        print(f"  AUROC {c['auroc']}, TPR {c['tpr']}, FPR {c['fpr']}; {c['seconds']:.0f} s", flush=True)
        done += 1
    return done


# --- the block ---------------------------------------------------------------------------------------------------


def _current_fingerprints() -> dict[str, set[str]]:
    """Each test suspect's fingerprints: every build's (:meth:`suspects.zoo.Zoo.known_fingerprints`)."""
    from suspects.zoo import default_zoo

    zoo = default_zoo()
    return {e.ref: zoo.known_fingerprints(e) for e in zoo.entries("test")}


def _summary(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def _seconds(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} [{min(values):.0f}, {max(values):.0f}]"


def render_block(store: dict[str, Any]) -> str:
    from runs.pages import machines_text
    from runs.published_detection import SETTING, not_found_text, published_text, screening_for

    prints = _current_fingerprints()
    cells = grid()
    states = {(ref, m): cell_state(store, ref, m, prints.get(ref)) for _, ref, m in cells}
    measured = [store["cells"][key(ref, m)] for _, ref, m in cells if states[(ref, m)] == "measured"]
    lines = ["## Measured over the suspect zoo", "",
             f"Written by `python {SCRIPT}` from `docs/screening-grid.json` (`run` screens what is missing). "
             f"**{len(measured)} of {len(cells)} screens measured**: every backdoored test suspect of the zoo "
             "(3 training seeds per attack, seed 0 the demo bundle's; `docs/zoo.md`) x every method at its `quick` "
             f"preset, one full screen each: calibrated on the suspect's clean defense pool for a {100 * FPR:.0f}% "
             "target FPR, scored on its clean test images and their triggered copies (all-to-one: target-class "
             "images left out). *AUROC* separates triggered from clean test images (0.5 = chance); *TPR* is the "
             "share of triggered test images above the pool-chosen threshold, *FPR* the share of clean test images "
             "above it. Each value: the median [min, max] over the attack's suspects; n = suspects measured. "
             + SETTING, "",
             "| attack | method | n | AUROC | TPR at the threshold | FPR on clean test | seconds | published (another "
             "setting) |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in measured:
        groups.setdefault((c["attack"], c["method"]), []).append(c)
    for attack, method in dict.fromkeys((a, m) for a, _, m in cells):
        g = groups.get((attack, method), [])
        if not g:
            lines.append(f"| {attack} | {method} | 0 | not yet measured | | | | "
                         f"{published_text(screening_for(method, attack))} |")
            continue
        lines.append(f"| {attack} | {method} | {len(g)} | {_summary([c['auroc'] for c in g if c['auroc'] is not None])}"
                     f" | {_summary([c['tpr'] for c in g if c['tpr'] is not None])} | "
                     f"{_summary([c['fpr'] for c in g])} | {_seconds([c['seconds'] for c in g])} | "
                     f"{published_text(screening_for(method, attack))} |")
    lines += ["", not_found_text(list(METHODS))]
    lines += ["", "### Per suspect", "", "| suspect | weights (fingerprint) | method | AUROC | TPR | FPR | seconds |",
              "|---|---|---|---|---|---|---|"]
    for c in measured:
        lines.append(f"| `{c['ref']}` | `{c['fingerprint'][:12]}` | {c['method']} | {c['auroc']:.4f} | "
                     f"{c['tpr']:.3f} | {c['fpr']:.3f} | {c['seconds']:.0f} |")
    if measured:
        lines += ["", f"Measured {machines_text(measured)}, one screen at a time; seconds are the "
                  "screen's wall time there (calibration included, loading the suspect not)."]
    return "\n".join(lines)


def render(store: dict[str, Any], page: str) -> str:
    from runs.pages import splice

    return splice(page, BLOCK, SCRIPT, render_block(store))


def main(argv: list[str] | None = None) -> int:
    from runs.pages import load_store, write_or_check

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", default="doc", choices=("doc", "run"))
    ap.add_argument("--attacks", default="", help="comma-separated: these first")
    ap.add_argument("--methods", default="", help="comma-separated: these first")
    ap.add_argument("--minutes", type=float, default=30.0, help="stop starting new screens after this long")
    ap.add_argument("--check", action="store_true", help="exit 1 when the page's block differs from the store's")
    args = ap.parse_args(argv)
    store = load_store(STORE)
    if args.action == "run":
        n = fill(store, [a for a in args.attacks.split(",") if a] or None,
                 [m for m in args.methods.split(",") if m] or None, args.minutes)
        print(f"{n} screens run", flush=True)
    return write_or_check(DOC, render(store, DOC.read_text()), args.check)


if __name__ == "__main__":
    raise SystemExit(main())
