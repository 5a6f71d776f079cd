"""Write docs/stress.md from stored stress-test results, and fill the store cell by cell (resumable).

    python scripts/stress_doc.py                       # regenerate docs/stress.md from docs/stress-grid.json only
    python scripts/stress_doc.py --check               # exit 1 when docs/stress.md is not what the store gives
    python scripts/stress_doc.py run [--defenses fst,finetune] [--attacks badnets,blended] [--minutes 30]

The grid is every post-training defense of the registry (those that need no poisoned training set) at its
``quick`` preset on every attack of the suspect zoo (``assets/zoo.json``; its seed-0 suspects are the demo bundle's:
``demo:badnets`` ...; the clean one is the reference). A cell runs the defense once
(seed 0, the defense's default pool) and then the stress test (:mod:`defenses.stress`, the official protocol:
3 seeds) on the repaired model against ``demo:clean``; the clean reference's re-tuning is cached per attack and
seed in the store, so each is computed once. ``run`` fills the missing cells in grid order (``--defenses`` /
``--attacks`` first), saving the store after each, until ``--minutes`` have passed; a cell whose defense preset,
stress protocol or weights (the suspect's and the reference's fingerprints, :mod:`runs.pages`) changed since it was
measured is stale and redone. The document says which cells are not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

STORE = ROOT / "docs" / "stress-grid.json"
DOC = ROOT / "docs" / "stress.md"
REFERENCE = "demo:clean"
IN_PAPER = ("finetune", "anp", "sau", "fst", "btidbf")
"""Registered defenses the retuning-attack paper evaluates (FT, ANP, SAU, FST, BTI-DBF)."""


# --- the grid ----------------------------------------------------------------------------------------------------


def grid() -> tuple[list[str], list[str]]:
    """(post-training defenses in registry order, the benchmark's attacks: the zoo manifest's, each with a demo
    bundle suspect)."""
    from defenses import get_defense
    from defenses.registry import list_defenses
    from suspects.store import list_demo_suspects
    from suspects.zoo import default_zoo

    defenses = [d for d in list_defenses() if not get_defense(d).threat.poisoned_training_set]
    bundle = set(list_demo_suspects())
    attacks = [a for a in default_zoo().manifest["attacks"] if a != "clean" and a in bundle]
    return defenses, attacks


def quick_params(defense: str) -> dict[str, Any]:
    from dataclasses import asdict

    from defenses import get_defense

    return json.loads(json.dumps(asdict(get_defense(defense).make_params("quick")), default=str))


def protocol_params() -> dict[str, Any]:
    from dataclasses import asdict

    from defenses.stress import stress_params

    return asdict(stress_params("official"))


def load_store(path: Path = STORE) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"cells": {}, "reference_cache": {}}


def save_store(store: dict[str, Any], path: Path = STORE) -> None:
    from suspects.atomic import write_json

    write_json(path, store, indent=1, default=str)


def cell_state(store: dict[str, Any], defense: str, attack: str) -> str:
    """``measured``, ``stale`` (the quick preset or the protocol changed since) or ``missing``."""
    cell = store["cells"].get(f"{defense}|{attack}")
    if cell is None:
        return "missing"
    if cell.get("defense_params") != quick_params(defense) or cell["stress"].get("params") != protocol_params():
        return "stale"
    from suspects.identity import demo_fingerprints

    prints = demo_fingerprints()
    if (cell.get("fingerprint") != prints.get(f"demo:{attack}")
            or cell.get("reference_fingerprint") != prints.get(REFERENCE)):
        return "stale"  # measured on other weights than today's bundle (or before cells recorded their weights)
    return "measured"


# --- running cells -----------------------------------------------------------------------------------------------


def run_cell(store: dict[str, Any], defense: str, attack: str) -> dict[str, Any]:
    """Run ``defense`` (quick, seed 0) on ``demo:ATTACK`` and stress-test the repaired model; store the cell."""
    import suspects
    from defenses import run_defense
    from defenses.stress import stress_params, stress_test
    from runs.pages import machine_line, today
    from suspects.identity import fingerprint

    suspect = suspects.load(f"demo:{attack}")
    reference = suspects.load(REFERENCE)
    t0 = time.time()
    report = run_defense(defense, suspect, "quick", seed=0, suspect_ref=f"demo:{attack}")
    defense_seconds = time.time() - t0
    result = stress_test(report.suspect, reference, stress_params("official"),
                         suspect_ref=f"{defense} (quick) on demo:{attack}", reference_ref=REFERENCE,
                         reference_cache=store.setdefault("reference_cache", {}))
    keep = ("suspect", "reference", "protocol", "ba", "asr", "ba_after_retune", "asr_after_retune", "reference_ba",
            "reference_asr", "reference_ba_after_retune", "reference_asr_after_retune", "spread", "verdict",
            "verdict_reason", "params", "seeds", "retune_set", "n_clean", "n_poisoned", "device", "seconds")
    cell = {"defense": defense, "attack": attack, "preset": "quick", "defense_seed": 0,
            "fingerprint": fingerprint(suspect), "reference_fingerprint": fingerprint(reference),
            "defense_params": json.loads(json.dumps(report["params"], default=str)),
            "defense_seconds": round(defense_seconds, 1), "defense_failed": bool(report.get("failed")),
            "stress": {k: result[k] for k in keep},
            "measured": today(), "machine": machine_line()}
    store["cells"][f"{defense}|{attack}"] = cell
    return cell


def fill(store: dict[str, Any], defenses: list[str], attacks: list[str], minutes: float) -> int:
    """Run missing or stale cells (the named ones first) until ``minutes`` have passed; returns cells run."""
    all_d, all_a = grid()
    order = [(d, a) for d in defenses for a in attacks]
    order += [(d, a) for d in all_d for a in all_a if (d, a) not in order]
    deadline = time.time() + 60 * minutes
    done = 0
    for d, a in order:
        if time.time() > deadline:
            break
        if cell_state(store, d, a) == "measured":
            continue
        print(f"running {d} on {a} ...", flush=True)
        cell = run_cell(store, d, a)
        save_store(store)
        s = cell["stress"]
        print(f"  {d} {a}: ASR {s['asr']:.3f} -> {s['asr_after_retune']:.3f} after re-tuning "
              f"(reference {s['reference_asr_after_retune']:.3f}): {s['verdict']}; defense "
              f"{cell['defense_seconds']:.0f} s, stress {s['seconds']:.0f} s", flush=True)
        done += 1
    return done


# --- the document ------------------------------------------------------------------------------------------------


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _spread(s: dict[str, Any], key: str) -> str:
    sp = (s.get("spread") or {}).get(key)
    if not sp:
        return _f(s.get(key))
    return f"{sp['mean']:.3f} [{sp['min']:.3f}, {sp['max']:.3f}]"


HEAD = """# Stress test: is the repair more than skin-deep?

<!-- generated by scripts/stress_doc.py from docs/stress-grid.json; edit the script, not this file -->

A repaired model with a low ASR may only have *hidden* its backdoor. Min et al. ("Uncovering, Explaining, and
Mitigating the Superficial Safety of Backdoor Defense", NeurIPS 2024, arXiv 2410.09838) fine-tune purified models
for a few epochs on clean data with a handful of poisoned samples mixed in (their **retuning attack**, RA): many
purified models re-learn the backdoor at once, while a clean model (never backdoored) fine-tuned the same way stays at
a low ASR. Backdoor Lens runs the same test on any model and compares it with the clean model of the same family.

## The protocol (the defaults: preset `official`)

As the official script does (`AISafety-HKUST/stable_backdoor_purification`, `fine_tune/ft_poison.py`, read, not
copied):

1. The re-tuning set holds `pool_size` = 1,000 images: clean images of the suspect's **defense pool** (capped at its
   size; the demo suspects' pools hold 1,000), of which `n_poison` = 5 (0.5%) are *replaced* by images from **the
   attack's own poisoned training set**. Here that means the suspect's known poisoned training set: the training
   images its card's poisoning plan marks as poisoned (a demo suspect's `poisoned_indices.json`), with the suspect's
   trigger applied and the attack's label, i.e. images the backdoored model was trained on. A repaired model's card
   keeps its parent's plan. When none is known (a checkpoint with an adopted or borrowed trigger), the trigger is
   applied to pool images instead (`poison_source=auto`; the result says which: `retune_set.from`).
2. The clean images get the data's training augmentation (`augment=auto`: the suspect's own, from its card; the
   demo's is a random crop with 3 pixels of padding and no flip, as BackdoorBench gives MNIST; otherwise crop + flip
   for colour images), drawn **once** as the official script materialises its list; the poisoned ones none.
3. SGD lr 0.01, momentum 0.9, **no weight decay, no scheduler**, batch 128, 5 epochs, all weights, BN in train mode.
4. The **clean reference** (`demo:clean` for the demo family, whichever way the suspect is named; for a repaired
   model, the clean model of its parent's family; a card may name one, `provenance.clean_reference`;
   `--reference` otherwise) is re-tuned on the same sets.
5. BA and ASR before and after, on the test split, which is only measured. `seeds` = 3: each seed draws its own
   poisoned images, augmentation and batch order; the result gives the mean and the spread (min, max, sd).

**Verdict**, in this order (thresholds are parameters): `inconclusive` when fewer than `min_asr_images` (100)
triggered test images measure ASR; **not repaired** when the ASR before re-tuning is at least `not_repaired_asr`
(0.2): the backdoor was never removed; `inconclusive` when re-tuning costs the model more than `max_ba_drop` (0.1)
of BA (an ASR read off a collapsed model means nothing); `no reference` without a clean reference; **robust** when
the mean ASR after re-tuning is at most `tolerance` (0.1) above the clean reference's; **superficial** otherwise
(it comes back).

Preset `lens-v1` keeps the former settings (500 pool images with 5 of them triggered, weight decay 5e-4, no
augmentation, one seed, tolerance 0.05): `backdoor-lens stress TARGET --preset lens-v1`.

## Use

```
backdoor-lens stress demo:badnets                       # vs. demo:clean: 'not repaired'
backdoor-lens stress assets/demo/suspects/badnets       # the same model, the same reference and result
backdoor-lens stress RUN_ID --json                      # a stored run; the result is stored with it
backdoor-lens stress demo:clean                         # borrows the BadNets trigger; its own reference
backdoor-lens stress RUN_ID --set seeds=5 --set epochs=3 --reference none
```

`--json` prints `asr`, `ba`, `asr_after_retune`, `ba_after_retune` (means over the seeds), `spread` (mean, sd, min,
max and the values of each), `reference`, `reference_asr`, `reference_ba`, `reference_asr_after_retune`,
`reference_ba_after_retune`, `verdict`, `verdict_reason`, `protocol`, `params`, `seeds`, `retune_set`, `runs`,
`seconds`. Parameters (`--set NAME=VALUE`): `n_poison`, `pool_size`, `poison_source`, `epochs`, `lr`,
`momentum`, `weight_decay`, `batch_size`, `augment`, `augment_per_epoch`, `seeds`, `test_limit`, and the verdict's
`tolerance`, `not_repaired_asr`, `max_ba_drop`, `min_asr_images`. Bad input exits with code 2 and one line saying
why.

In the dashboard, every finished run has a **Stress test** button (Defenses page, under the run's result; Compare
page, "Stress test a run"): it runs in the background worker with a progress bar, the result is stored in the run's
folder (`stress.json`), shown as the column **ASR after re-tuning** on Compare and in `backdoor-lens compare`, and as
a "Stress test" section of the HTML report.

From Python:

```python
import suspects
from defenses.stress import stress_test
r = stress_test(suspects.load("demo:badnets"), suspects.load("demo:clean"))
r["verdict"], r["asr_after_retune"], r["spread"]["asr_after_retune"], r["reference_asr_after_retune"]
```
"""


VERDICTS = ("robust", "superficial", "not repaired", "inconclusive", "no reference")


def verdict_summary(store: dict[str, Any], defenses: list[str], attacks: list[str],
                    states: dict[tuple[str, str], str]) -> list[str]:
    """Lines of the verdict counts per attack (measured cells), naming the defenses whose repair held."""
    out = ["| attack | " + " | ".join(VERDICTS) + " | robust repairs |", "|---|" + "---|" * (len(VERDICTS) + 1)]
    for attack in attacks:
        cells = [store["cells"][f"{d}|{attack}"] for d in defenses if states[(d, attack)] == "measured"]
        counts = [sum(c["stress"]["verdict"] == v for c in cells) for v in VERDICTS]
        robust = ", ".join(c["defense"] for c in cells if c["stress"]["verdict"] == "robust") or "none"
        out.append(f"| {attack} | " + " | ".join(str(n) for n in counts) + f" | {robust} |")
    return [*out, ""]


def measured_on_text(cells: list[dict[str, Any]]) -> str:
    """Where and when ``cells`` were measured: the machine each records, and for cells made before they recorded
    one, their dates and torch device."""
    from runs.pages import machines_text

    known = [c for c in cells if c.get("machine")]
    older = [c for c in cells if not c.get("machine")]
    parts = []
    if known:
        parts.append(f"{machines_text(known)} ({len(known)} cells, one at a time on an otherwise idle machine)")
    if older:
        dates = sorted({c["measured"] for c in older})
        devices = sorted({c["stress"]["device"] for c in older})
        parts.append(f"{', '.join(dates)} on {', '.join(devices)} ({len(older)} cells measured before cells recorded "
                     "their machine, one at a time on one core of a shared 2-core machine, so their seconds are "
                     "upper bounds)")
    return "; ".join(parts)


def render(store: dict[str, Any]) -> str:
    """The whole of docs/stress.md from ``store`` (and the registry, the demo bundle, runs.published)."""
    from runs.published import RETUNE_NOT_FOUND, retune_published_for

    defenses, attacks = grid()
    states = {(d, a): cell_state(store, d, a) for d in defenses for a in attacks}
    n_done = sum(v == "measured" for v in states.values())
    lines = [HEAD, "## Measured: every post-training `quick` preset on every attack of the zoo", ""]
    from suspects.store import list_demo_suspects

    outside = [n for n in list_demo_suspects() if n != "clean" and n not in attacks]
    if outside:
        lines += [f"The grid covers the attacks of the suspect zoo ({', '.join(attacks)}: the benchmark's, "
                  "`docs/zoo.md`). The other demo suspects "
                  f"({', '.join(f'`demo:{n}`' for n in outside)}) join it when they join the zoo; until then "
                  "`backdoor-lens stress RUN_ID` tests any repair of them.", ""]
    rest = ("" if n_done == len(states) else "; the others say *not yet measured* (the grid costs several CPU-hours "
            "on 2 cores; `python scripts/stress_doc.py run --minutes M` resumes it)")
    lines.append(
        f"Generated by `python scripts/stress_doc.py` from `docs/stress-grid.json` (`run` fills missing cells). "
        f"**{n_done} of {len(states)} cells measured**{rest}. Each cell: the defense's "
        "`quick` preset once (seed 0), then the official protocol on the repaired model (3 seeds) against "
        f"`{REFERENCE}`; ASR before re-tuning is the repaired model's, after re-tuning the mean [min, max] over the "
        "seeds. The training-time defenses (DBD, CBD) are not in the grid: they retrain from scratch and are not "
        "post-training repairs.")
    lines.append("")
    lines += verdict_summary(store, defenses, attacks, states)
    lines.append(f"Published ASR after the retuning attack (column *published*; the paper evaluates FT, ANP, SAU, "
                 f"FST and BTI-DBF, '–' for the others): {RETUNE_NOT_FOUND}")
    lines.append("")
    for attack in attacks:
        lines.append(f"### {attack}")
        lines.append("")
        lines.append("| defense (`quick`) | BA | ASR before re-tuning | ASR after re-tuning [min, max] | BA after "
                     "re-tuning | clean reference: ASR after re-tuning [min, max] | verdict | seconds (defense + "
                     "stress) | published ASR after re-tuning |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for d in defenses:
            state = states[(d, attack)]
            pub = retune_published_for(d, attack)
            pub_text = ("; ".join(f"{100 * p.asr:.1f}% ({p.tag}: {p.source})" for p in pub)
                        or ("not found" if d in IN_PAPER else "–"))
            if state != "measured":
                why = "not yet measured" if state == "missing" else "not yet re-measured (preset changed since)"
                lines.append(f"| {d} | {why} | | | | | | | {pub_text} |")
                continue
            c = store["cells"][f"{d}|{attack}"]
            s = c["stress"]
            failed = " (defense gave up)" if c.get("defense_failed") else ""
            lines.append(f"| {d}{failed} | {_f(s['ba'])} | {_f(s['asr'])} | {_spread(s, 'asr_after_retune')} | "
                         f"{_spread(s, 'ba_after_retune')} | {_spread(s, 'reference_asr_after_retune')} | "
                         f"**{s['verdict']}** | {c['defense_seconds']:.0f} + {s['seconds']:.0f} | {pub_text} |")
        lines.append("")
        refs = [store["cells"][f"{d}|{attack}"]["stress"]["reference_asr_after_retune"] for d in defenses
                if states[(d, attack)] == "measured"]
        if refs and max(refs) > 0.3:
            lines.append(f"On {attack} the clean reference itself learns the trigger from the 5 poisoned images (its "
                         f"ASR after re-tuning: {max(refs):.3f}), so the test tells a superficial repair from a robust "
                         "one only above that level.")
            lines.append("")
    measured = [c for c in store["cells"].values() if states.get((c["defense"], c["attack"])) == "measured"]
    if measured:
        lines.append(f"Measured {measured_on_text(measured)}. Seeds of the re-tuning: "
                     f"{', '.join(str(s) for s in measured[0]['stress']['seeds'])}; the clean reference's "
                     "re-tuning is computed once per attack and seed and shared by the cells.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", default="doc", choices=("doc", "run"))
    ap.add_argument("--defenses", default="", help="comma-separated: these first")
    ap.add_argument("--attacks", default="", help="comma-separated: these first")
    ap.add_argument("--minutes", type=float, default=30.0, help="stop starting new cells after this long")
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/stress.md differs from the store's")
    args = ap.parse_args()
    store = load_store()
    if args.action == "run":
        all_d, all_a = grid()
        ds = [d for d in args.defenses.split(",") if d] or all_d
        as_ = [a for a in args.attacks.split(",") if a] or all_a
        n = fill(store, ds, as_, args.minutes)
        print(f"{n} cells run", flush=True)
    text = render(store)
    if args.check:
        same = DOC.is_file() and DOC.read_text() == text
        print("docs/stress.md is up to date" if same else "docs/stress.md differs from the store's; regenerate it")
        return 0 if same else 1
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
