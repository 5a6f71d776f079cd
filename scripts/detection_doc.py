"""Neural Cleanse over the suspect zoo: fill docs/detection-grid.json suspect by suspect (resumable), and write the
measured block of docs/detection.md from it.

    python scripts/detection_doc.py                  # rewrite the block of docs/detection.md from the store only
    python scripts/detection_doc.py --check          # exit 1 when the block is not what the store gives
    python scripts/detection_doc.py run [--attacks badnets,clean] [--minutes 30]

The grid is every test suspect of the zoo (``assets/zoo.json``: 3 training seeds per attack and of the clean
model; seed 0 is the demo bundle's), each scanned once with the default budget (:class:`analysis.reverse.
ScanConfig`). A cell records the fingerprint of the weights it scanned; a cell whose weights or budget changed
since is stale and ``run`` redoes it. Rates: over the backdoored suspects, the share whose verdict reaches each
level (a true positive), whose most suspicious class is the attack's target; over the clean ones, the share whose
verdict reaches each level (a false positive).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

STORE = ROOT / "docs" / "detection-grid.json"
DOC = ROOT / "docs" / "detection.md"
BLOCK = "detection"
SCRIPT = "scripts/detection_doc.py"
LEVELS = ("flagged", "suspicious", "clean", "inconclusive")
"""Verdict levels, most alarming first; a verdict *reaches* a level when it is that level or a more alarming one."""


def scan_config() -> dict[str, Any]:
    from analysis.reverse import ScanConfig

    return asdict(ScanConfig())


def grid(attacks: list[str] | None = None) -> list[tuple[str, str]]:
    """(attack, zoo reference) of every test suspect, the clean model last; built or not."""
    from suspects.zoo import default_zoo

    zoo = default_zoo()
    names = [a for a in zoo.manifest["attacks"] if a != "clean"] + ["clean"]
    if attacks:
        names = [a for a in attacks if a in names] + [a for a in names if a not in attacks]
    return [(a, e.ref) for a in names for e in zoo.entries("test", a)]


def current_fingerprint(ref: str) -> str | None:
    """The fingerprint of ``ref``'s weights now (:func:`suspects.zoo.current_fingerprint`)."""
    from suspects.zoo import current_fingerprint as now

    return now(ref)


def known_fingerprints(ref: str) -> set[str]:
    """Every fingerprint ``ref``'s weights have had (:func:`suspects.zoo.known_fingerprints`: the manifest's, its
    recorded rebuilds' and the build on disk here): a scan on any of them is a scan of this suspect."""
    from suspects.zoo import known_fingerprints as known

    return known(ref)


def cell_state(store: dict[str, Any], ref: str, fingerprint: str | None = None) -> str:
    """``measured``, ``stale`` (the weights or the budget changed since) or ``missing``. The weights are the
    suspect's when the cell's fingerprint is ``fingerprint`` (given) or one of :func:`known_fingerprints`."""
    cell = store["cells"].get(ref)
    if cell is None:
        return "missing"
    known = {fingerprint} if fingerprint is not None else known_fingerprints(ref)
    if cell.get("config") != scan_config() or (known and cell.get("fingerprint") not in known):
        return "stale"
    return "measured"


def run_cell(store: dict[str, Any], attack: str, ref: str) -> dict[str, Any]:
    """Scan ``ref`` with the default budget; store and return the cell."""
    import numpy as np

    import suspects
    from analysis.reverse import ScanConfig, known_trigger_overlap, scan_images
    from runs.pages import machine_line, today
    from runs.scans import scan_suspect
    from suspects.identity import fingerprint

    suspect = suspects.load(ref)
    t0 = time.time()
    r = scan_suspect(suspect, ScanConfig())
    seconds = time.time() - t0
    v = r.verdict(list(suspect.classes))
    trig = suspect.trigger if attack != "clean" else None
    target = trig.target if trig is not None and trig.mapping == "all-to-one" else None
    finite = [float(a) for k, a in enumerate(r.anomaly) if k != target and np.isfinite(a)]
    cell: dict[str, Any] = {
        "attack": attack, "ref": ref, "fingerprint": fingerprint(suspect), "config": scan_config(),
        "level": v.level, "verdict_class": v.cls, "flagged": [int(k) for k in r.flagged],
        "most_suspicious": int(r.most_suspicious), "target": target,
        "target_index": None if target is None or not np.isfinite(r.anomaly[target]) else float(r.anomaly[target]),
        "largest_other_index": max(finite) if finite else None,
        "l1": [None if not np.isfinite(x) else round(float(x), 3) for x in r.l1],
        "anomaly": [None if not np.isfinite(x) else round(float(x), 3) for x in r.anomaly],
        "seconds": round(seconds, 1), "machine": machine_line(), "measured": today(),
    }
    if target is not None:
        own = scan_images(suspect, ScanConfig()) if trig.sample_specific else None  # each image's own trigger
        ov = known_trigger_overlap(r.masks[target], trig, own)
        cell["mass_on_trigger"] = round(float(ov["mass_on_trigger"]), 3)
    store["cells"][ref] = cell
    return cell


def fill(store: dict[str, Any], attacks: list[str] | None, minutes: float) -> int:
    """Scan missing or stale suspects that are built (named attacks first) until ``minutes`` have passed."""
    from runs.pages import save_store
    from suspects.zoo import default_zoo

    zoo = default_zoo()
    deadline, done = time.time() + 60 * minutes, 0
    for attack, ref in grid(attacks):
        if time.time() > deadline:
            break
        if not zoo.present(zoo.entry(ref)):
            print(f"{ref}: not built (backdoor-lens zoo build --only {ref[4:]}); skipped", flush=True)
            continue
        if cell_state(store, ref) == "measured":
            continue
        print(f"scanning {ref} ...", flush=True)
        c = run_cell(store, attack, ref)
        save_store(store, STORE)
        print(f"  {ref}: {c['level']} (most suspicious class {c['most_suspicious']}, target {c['target']}, "
              f"target index {c['target_index']}); {c['seconds']:.0f} s", flush=True)
        done += 1
    return done


# --- the block ---------------------------------------------------------------------------------------------------


def _f(v: float | None, nd: int = 2) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def reaches(level: str, at_least: str) -> bool:
    """Whether a verdict ``level`` is ``at_least`` as alarming (flagged > suspicious > clean; inconclusive: never)."""
    order = {"flagged": 2, "suspicious": 1, "clean": 0}
    return level in order and order[level] >= order[at_least]


def rates(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts over ``cells``: n, how many reach flagged / suspicious, inconclusive, and (backdoored) target found."""
    out: dict[str, Any] = {"n": len(cells),
                           "flagged": sum(reaches(c["level"], "flagged") for c in cells),
                           "suspicious_or_flagged": sum(reaches(c["level"], "suspicious") for c in cells),
                           "inconclusive": sum(c["level"] == "inconclusive" for c in cells)}
    with_target = [c for c in cells if c.get("target") is not None]
    if with_target:
        out["target_found"] = sum(c["most_suspicious"] == c["target"] for c in with_target)
    return out


def _kn(k: int, n: int) -> str:
    return f"{k}/{n}" if n else "–"


def render_block(store: dict[str, Any]) -> str:
    from analysis.reverse import ScanConfig
    from runs.pages import machines_text
    from runs.published_detection import SETTING, detection_for, not_found_text, published_text

    cells_all = grid()
    states = {ref: cell_state(store, ref) for _, ref in cells_all}
    measured = [store["cells"][ref] for _, ref in cells_all if states[ref] == "measured"]
    n_done = len(measured)
    lines = ["## Measured over the suspect zoo", "",
             f"Written by `python {SCRIPT}` from `docs/detection-grid.json` (`run` scans what is missing). "
             f"**{n_done} of {len(cells_all)} test suspects scanned** (the zoo's test suspects: training seeds 0-2 of "
             "every attack and of the clean model, seed 0 being the demo bundle's; `docs/zoo.md`). Each scan: the "
             f"default budget (`{ScanConfig()!r}`), once. Each row names the fingerprint of the weights it scanned; "
             "a test fails when one is not a current test suspect's.", ""]
    by_attack: dict[str, list[dict[str, Any]]] = {}
    for c in measured:
        by_attack.setdefault(c["attack"], []).append(c)
    # rates
    backdoored = [c for c in measured if c["attack"] != "clean"]
    clean = by_attack.get("clean", [])
    lines += ["### Rates", "",
              "A verdict *reaches* a level when it is that level or a more alarming one (flagged > suspicious > "
              "clean). True positives are counted over backdoored suspects, false positives over clean ones; *target "
              "found*: the most suspicious class (the smallest mask) is the attack's target. " + SETTING, "",
              "| suspects | n | reach **flagged** | reach **suspicious** | inconclusive | target found | published "
              "(another setting) |",
              "|---|---|---|---|---|---|---|"]
    for attack in dict.fromkeys(a for a, _ in cells_all if a != "clean"):
        if attack in by_attack:
            r = rates(by_attack[attack])
            lines.append(f"| {attack} | {r['n']} | {_kn(r['flagged'], r['n'])} | "
                         f"{_kn(r['suspicious_or_flagged'], r['n'])} | {r['inconclusive']} | "
                         f"{_kn(r.get('target_found', 0), r['n'])} | "
                         f"{published_text(detection_for(attack))} |")
    expected = Counter(a for a, _ in cells_all)
    complete = [a for a in by_attack if a != "clean" and len(by_attack[a]) == expected[a]]
    partial = [a for a in by_attack if a != "clean" and a not in complete]
    pooled = [("**all backdoored** (true-positive rate)", backdoored)] if backdoored else []
    if partial and complete:
        pooled.insert(0, (f"**attacks with every test suspect scanned** ({', '.join(complete)})",
                          [c for a in complete for c in by_attack[a]]))
    for label, group in pooled:
        r = rates(group)
        lines.append(f"| {label} | {r['n']} | {_kn(r['flagged'], r['n'])} | "
                     f"{_kn(r['suspicious_or_flagged'], r['n'])} | {r['inconclusive']} | "
                     f"{_kn(r.get('target_found', 0), r['n'])} | |")
    if clean:
        r = rates(clean)
        lines.append(f"| **clean** (false-positive rate) | {r['n']} | {_kn(r['flagged'], r['n'])} | "
                     f"{_kn(r['suspicious_or_flagged'], r['n'])} | {r['inconclusive']} | – | |")
    lines += ["", not_found_text(["neural_cleanse"])]
    if partial and backdoored:
        lines += ["", "The *all backdoored* row pools every scanned suspect, so an attack with fewer of its test "
                  f"suspects scanned ({', '.join(f'{a}: {len(by_attack[a])} of {expected[a]}' for a in partial)}) "
                  "weighs less in it than one with all of them; the row above it pools only complete attacks."]
    lines += ["", "### Per suspect", "",
              "| attack | suspect | weights (fingerprint) | verdict | most suspicious class | target | target's "
              "anomaly index | largest other index | recovered mask's mass on the trigger | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for attack, ref in cells_all:
        if states[ref] != "measured":
            why = "not yet scanned" if states[ref] == "missing" else "not yet re-scanned (weights or budget changed)"
            lines.append(f"| {attack} | `{ref}` | | {why} | | | | | | |")
            continue
        c = store["cells"][ref]
        mass = "–" if c.get("mass_on_trigger") is None else f"{100 * c['mass_on_trigger']:.0f}%"
        lines.append(f"| {attack} | `{ref}` | `{c['fingerprint'][:12]}` | **{c['level']}** | {c['most_suspicious']} | "
                     f"{'–' if c['target'] is None else c['target']} | {_f(c['target_index'])} | "
                     f"{_f(c['largest_other_index'])} | {mass} | {c['seconds']:.0f} |")
    if clean:
        lines += ["", "### The clean suspects' anomaly indices (the reference)", "",
                  "| suspect | " + " | ".join(f"class {k}" for k in range(len(clean[0]["anomaly"]))) + " |",
                  "|---|" + "---|" * len(clean[0]["anomaly"])]
        for c in clean:
            lines.append(f"| `{c['ref']}` | " + " | ".join(_f(a) for a in c["anomaly"]) + " |")
    if measured:
        lines += ["", f"Measured {machines_text(measured)}, one scan at a time. Seconds are the "
                  "scan's wall time on that machine."]
    return "\n".join(lines)


def render(store: dict[str, Any], page: str) -> str:
    from runs.pages import splice

    return splice(page, BLOCK, SCRIPT, render_block(store))


def main(argv: list[str] | None = None) -> int:
    from runs.pages import load_store, write_or_check

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", default="doc", choices=("doc", "run"))
    ap.add_argument("--attacks", default="", help="comma-separated: these first")
    ap.add_argument("--minutes", type=float, default=30.0, help="stop starting new scans after this long")
    ap.add_argument("--check", action="store_true", help="exit 1 when the page's block differs from the store's")
    args = ap.parse_args(argv)
    store = load_store(STORE)
    if args.action == "run":
        n = fill(store, [a for a in args.attacks.split(",") if a] or None, args.minutes)
        print(f"{n} suspects scanned", flush=True)
    return write_or_check(DOC, render(store, DOC.read_text()), args.check)


if __name__ == "__main__":
    raise SystemExit(main())
