"""The defense benchmark: run the grid into a run store, and regenerate its document from that store.

    python scripts/benchmark.py run   [--defenses a,b] [--suspects badnets,blended,sig,wanet] [--presets quick,paper]
                                      [--seeds 3] [--runs bench-runs] [--pool-size N]
    python scripts/benchmark.py write [--runs bench-runs] [--out docs/defense-benchmarks.md]
    python scripts/benchmark.py all   (run, then write)

``run`` executes every (defense, demo suspect, preset, seed) cell that the store does not hold yet, one at a time
(timings are only meaningful alone on the machine), each measured on the whole demo test split, with the run's
config, seconds and device stored beside it. ``write`` reads the store only: per attack a table of mean +- sd over
the seeds of BA, BA drop, ASR, RA, DER and seconds, the Pareto front, the published numbers for the same method
(tagged, another setting), and the goal checks; the per-run rows go to a CSV next to the document. Only runs on the
demo suspects' *current* weights count (their before-metrics equal the suspect card's): runs made on an earlier
bundle stay in the store but are left out, and the document says how many.
Defenses never see the test split (the runner seals it); their presets were chosen on the development split
(``scripts/tune_on_dev.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")

from runs.compare import mean_sd_text  # noqa: E402 - after the path set-up above

ATTACKS = ("badnets", "blended", "sig", "wanet")
DOC = Path("docs/defense-benchmarks.md")
# defenses whose ``quick`` preset was chosen on the development split over seeds 0-2 (their docstrings give the
# numbers); the others' rows are marked until they are re-derived (issue 13)
DEV_CHOSEN = {"finetune", "sau", "fst", "ibau", "awm", "linf_prune", "fineprune", "dbd", "cbd"}
POST_TRAINING = ("shortcut", "linf_prune", "awm", "anp", "fineprune", "finetune", "sau", "fst", "ibau")


def _cells_done(store, suspect_ref: str) -> set[tuple[str, str, str, int, int]]:
    from runs.compare import runs_table

    table = runs_table(store, suspect_ref)
    table = table[on_current_presets(store, table)]  # a cell run with an earlier version of its preset is redone
    return {(d, p, o, int(s), int(n)) for d, p, o, s, n in
            zip(table["defense"], table["preset"], table["overrides"], table["seed"], table["clean_images"],
                strict=True)}


def run_grid(args: argparse.Namespace) -> int:
    import suspects
    from backdoor_lens.cli import parse_sets
    from defenses import list_defenses
    from defenses.runner import resolve_pool_size
    from runs.jobs import create_run, execute
    from runs.store import RunStore

    store = RunStore(args.runs)
    names = [d for d in (args.defenses.split(",") if args.defenses else list_defenses()) if d]
    overrides = parse_sets(args.set)
    if overrides and len(names) != 1:
        print("--set overrides one defense's parameters: name exactly one with --defenses", file=sys.stderr)
        return 2
    label = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    failures = 0
    for attack in [s for s in args.suspects.split(",") if s]:
        ref = f"demo:{attack}"
        suspect = suspects.load(ref)
        pool_size = resolve_pool_size(args.pool_size, len(suspect.defense_pool))
        done = _cells_done(store, ref)
        for defense in names:
            for preset in [p for p in args.presets.split(",") if p]:
                for seed in range(args.seeds):
                    if (defense, preset, label, seed, pool_size) in done:
                        continue
                    t = time.time()
                    rid = create_run(store, defense, ref, preset, overrides, pool_size, seed, None, pid=os.getpid(),
                                     measure="full", suspect=suspect)
                    status = execute(store, rid, None, suspect=suspect)
                    rec = store.get(rid)
                    print(f"{defense:11s} {preset:6s} {attack:8s} seed {seed}: {status}"
                          + (f" ({rec.error})" if status != "finished" else "") + f", {time.time() - t:.0f} s",
                          flush=True)
                    failures += status != "finished"
    return 1 if failures else 0


def current_card(attack: str) -> dict:
    """The demo suspect's card as committed now (read from disk; the model is not loaded)."""
    from suspects.store import DEMO_SUSPECTS

    return json.loads((DEMO_SUSPECTS / attack / "suspect.json").read_text())


def on_current_weights(table, card: dict):
    """Rows whose before-metrics are the card's: runs on the suspect's current weights (the runner reads "before"
    from the card when the weights' fingerprint matches, or measures the same numbers)."""
    m = card["metrics"]
    keep = (table["ba_before"] - m["ba"]).abs() < 1e-6
    for key in ("asr", "ra"):
        if m.get(key) is not None:
            keep &= (table[f"{key}_before"] - m[key]).abs() < 1e-6
    return keep


def on_current_presets(store, table):
    """Rows whose run used today's preset: every parameter the preset sets (and that the row's overrides leave
    alone) has the value the preset gives now. A run made before a preset was re-chosen (or before a parameter
    existed) is left out: its numbers belong to another setting."""
    from dataclasses import asdict

    import pandas as pd

    from defenses.registry import get_defense

    presets: dict[tuple[str, str], dict] = {}
    keep = []
    for run_id, defense, preset, overrides in zip(table["run_id"], table["defense"], table["preset"],
                                                  table["overrides"], strict=True):
        if (defense, preset) not in presets:
            try:
                presets[defense, preset] = asdict(get_defense(defense).make_params(preset, {}))
            except ValueError:  # a defense or preset that no longer exists: not today's preset
                presets[defense, preset] = {}
        now = presets[defense, preset]
        used = (store.report(run_id) or {}).get("params") or {}
        overridden = {part.split("=", 1)[0] for part in overrides.split(", ") if part}
        keep.append(bool(now) and all(k in used and json.dumps(used[k]) == json.dumps(v)
                                      for k, v in now.items() if k not in overridden))
    return pd.Series(keep, index=table.index, dtype=bool)


def collect(store, attacks=ATTACKS):
    """Per attack: (the suspect's before-metrics, grouped runs with drop columns), from the store only, and the
    runs: those on the demo suspects' current weights (``stale``: how many runs on earlier weights were left out)
    made with today's presets (``old_presets``: how many runs with an earlier version of a preset were left out)."""
    import pandas as pd

    from runs.compare import group_runs, runs_table

    out = {}
    frames = []
    stale = old_presets = 0
    for attack in attacks:
        table = runs_table(store, f"demo:{attack}")
        if table.empty:
            continue
        keep = on_current_weights(table, current_card(attack))
        stale += int((~keep).sum())
        table = table[keep]
        current = on_current_presets(store, table)
        old_presets += int((~current).sum())
        table = table[current]
        if table.empty:
            continue
        table = table.assign(attack=attack, ba_drop=table["ba_before"] - table["ba"])
        frames.append(table)
        groups = group_runs(table)
        drops = table.groupby(["defense", "preset", "overrides"])["ba_drop"].agg(["mean", "std"]).reset_index()
        groups = groups.merge(drops.rename(columns={"mean": "drop_mean", "std": "drop_sd"}),
                              on=["defense", "preset", "overrides"])
        before = {k: float(table[f"{k}_before"].iloc[0]) for k in ("ba", "asr", "ra")}
        out[attack] = (before, groups)
    runs = pd.concat(frames) if frames else pd.DataFrame()
    runs.attrs["stale"] = stale
    runs.attrs["old_presets"] = old_presets
    return out, runs


def _front(groups) -> set[tuple[str, str]]:
    from runs.compare import pareto_front

    gave_up = groups["n_failed"] >= groups["n_seeds"] if "n_failed" in groups else None  # every seed gave up
    mask = pareto_front(groups["ba_mean"], groups["asr_mean"], eligible=None if gave_up is None else ~gave_up)
    return {(d, _label(p, o)) for d, p, o, m in
            zip(groups["defense"], groups["preset"], groups["overrides"], mask, strict=True) if m}


def _label(preset: str, overrides: str) -> str:
    return f"{preset} ({overrides})" if overrides else preset


def goal_lines(results) -> list[str]:
    """The issues' goals, checked on the stored numbers (means over the seeds)."""
    lines = []
    for attack, (_, g) in results.items():
        quick = g[(g["preset"] == "quick") & (g["overrides"] == "") & g["defense"].isin(POST_TRAINING)]
        front = _front(g)
        hits = [f"{d} ({mean_sd_text(a, s)} ASR, drop {dr:.3f})" for d, a, s, dr in
                zip(quick["defense"], quick["asr_mean"], quick["asr_sd"], quick["drop_mean"], strict=True)
                if a <= 0.05 and dr <= 0.03 and (d, "quick") in front]
        lines.append(f"- {attack}: a post-training `quick` preset with mean ASR <= 0.05 at a mean BA drop <= 0.03 on "
                     f"the Pareto front: **{'met' if hits else 'not met'}**" + (f" by {', '.join(hits)}" if hits else ""))
    slow = []
    for attack, (_, g) in results.items():
        for d, p, o, sec in zip(g["defense"], g["preset"], g["overrides"], g["seconds_mean"], strict=True):
            if p == "quick" and not o and d in POST_TRAINING and sec > 120:
                slow.append(f"{d} on {attack} ({sec:.0f} s)")
    lines.append(f"- post-training `quick` presets <= 120 s: **{'met' if not slow else 'not met'}**"
                 + (f": over on {', '.join(slow)}" if slow else ""))
    lines += retraining_goal_lines(results)
    lines.append(paper_goal_line(results))
    lines.append(coverage_line(results))
    if "badnets" in results:
        g = results["badnets"][1]
        new = g[(g["preset"] == "quick") & (g["overrides"] == "") & g["defense"].isin(["sau", "fst", "ibau"])]
        if len(new):
            ok = all(new["asr_mean"] <= 0.10) and len(new) == 3
            lines.append(f"- BadNets, SAU, FST and i-BAU `quick` all at mean ASR <= 0.10: **{'met' if ok else 'not met'}** "
                         f"({', '.join(f'{d} {a:.3f}' for d, a in zip(new['defense'], new['asr_mean'], strict=True))})")
    if "blended" in results:
        g = results["blended"][1]
        new = g[(g["preset"] == "quick") & (g["overrides"] == "") & g["defense"].isin(["sau", "fst", "ibau"])]
        if len(new):
            hits = [d for d, a, dr in zip(new["defense"], new["asr_mean"], new["drop_mean"], strict=True)
                    if a <= 0.10 and dr <= 0.04]
            lines.append(f"- Blended, one of SAU / FST / i-BAU `quick` at mean ASR <= 0.10 with a BA drop <= 0.04: "
                         f"**{'met by ' + ', '.join(hits) if hits else 'not met'}**")
    return lines


RETRAINING = ("dbd", "cbd")
# issue 13: these methods' ``paper`` presets should land in the published range on badnets and blended
PAPER_CHECKED = ("awm", "anp", "finetune", "fineprune", "shortcut")


def retraining_goal_lines(results) -> list[str]:
    """Issue 13's goals for DBD and CBD ``quick``: <= 10 minutes, BA sd over 3 seeds <= 0.03, and DBD on BadNets at
    ASR <= 0.10 with BA >= 0.82; "not run yet" while the store has no such runs."""
    lines = []
    for d in RETRAINING:
        rows = [(attack, r) for attack, (_, g) in results.items()
                for r in g[(g["defense"] == d) & (g["preset"] == "quick") & (g["overrides"] == "")].itertuples()]
        if not rows:
            lines.append(f"- {d.upper()} `quick` <= 10 minutes with a BA sd over 3 seeds <= 0.03: **not run yet** on "
                         "this bundle")
            continue
        slow = [f"{a} {r.seconds_mean:.0f} s" for a, r in rows if r.seconds_mean > 600]
        loose = [f"{a} sd {r.ba_sd:.3f}" for a, r in rows if r.n_seeds < 3 or not r.ba_sd <= 0.03]
        ok = not slow and not loose
        verdict = "met" if ok else "not met"
        lines.append(f"- {d.upper()} `quick` <= 10 minutes with a BA sd over 3 seeds <= 0.03: **{verdict}** "
                     f"on {', '.join(a for a, _ in rows)}" + (f" (over time: {', '.join(slow)})" if slow else "")
                     + (f" (spread or seeds: {', '.join(loose)})" if loose else ""))
        if d == "dbd":
            bad = [r for a, r in rows if a == "badnets"]
            if bad:
                r = bad[0]
                ok = r.asr_mean <= 0.10 and r.ba_mean >= 0.82
                verdict = "met" if ok else "not met"
                lines.append(f"- DBD `quick` on BadNets at mean ASR <= 0.10 with mean BA >= 0.82: **{verdict}** "
                             f"(BA {mean_sd_text(r.ba_mean, r.ba_sd)}, ASR {mean_sd_text(r.asr_mean, r.asr_sd)})")
    return lines


def paper_goal_line(results) -> str:
    """Which of the ``paper`` presets issue 13 compares with published numbers have 3 seeds on badnets and blended,
    and ANP's explicit goal (ASR <= 0.05 at a BA cost of at most 7 points, as BackdoorBench reports)."""
    have, missing = [], []
    for d in PAPER_CHECKED:
        for attack in ("badnets", "blended"):
            g = results.get(attack, (None, None))[1]
            hit = None if g is None else g[(g["defense"] == d) & (g["preset"] == "paper") & (g["overrides"] == "")]
            (have if hit is not None and len(hit) and int(hit["n_seeds"].iloc[0]) >= 3 else missing).append(
                f"{d}/{attack}")
    text = (f"- `paper` presets of {', '.join(PAPER_CHECKED)} on badnets and blended, 3 seeds, beside the published "
            f"numbers: {len(have)} of {len(have) + len(missing)} cells run"
            + (f" (not yet: {', '.join(missing)})" if missing else ""))
    anp = [(a, r) for a in ("badnets", "blended") if a in results
           for r in results[a][1][(results[a][1]["defense"] == "anp") & (results[a][1]["preset"] == "paper")
                                  & (results[a][1]["overrides"] == "")].itertuples()]
    if anp:
        ok = all(r.asr_mean <= 0.05 and r.drop_mean <= 0.07 for _, r in anp)
        text += (f"; ANP `paper` at ASR <= 0.05 with a BA drop <= 0.07: **{'met' if ok else 'not met'}** ("
                 + ", ".join(f"{a} ASR {r.asr_mean:.3f}, drop {r.drop_mean:.3f}" for a, r in anp) + ")")
    return text


def coverage_line(results) -> str:
    """How much of the grid (every defense x demo attack x quick / paper, 3 seeds) the store holds."""
    from defenses import list_defenses

    cells = [(d, a, p) for d in list_defenses() for a in ATTACKS for p in ("quick", "paper")]
    done = set()
    for attack, (_, g) in results.items():
        for r in g[(g["overrides"] == "") & (g["n_seeds"] >= 3)].itertuples():
            done.add((r.defense, attack, r.preset))
    quick_missing = sorted({d for d, a, p in cells if p == "quick" and (d, a, p) not in done})
    return (f"- grid coverage (defense x attack x preset with 3 seeds): {len(done & set(cells))} of {len(cells)} "
            "cells; "
            f"`quick` not yet complete for: {', '.join(quick_missing) or 'none'}; the `paper` presets are CPU-hours "
            "each on this machine and are run as time allows")


HEADER = ("# Defense benchmarks on the demo suspects", "",
          "Generated by `python scripts/benchmark.py write` from the benchmark run store (`bench-runs/`, filled by "
          "`python scripts/benchmark.py run`); do not edit by hand.")


def setting_text(runs) -> str:
    """The setting line, from the current demo cards and the runs' pools (never typed by hand)."""
    cards = [current_card(a) for a in ATTACKS]
    widths = sorted({int((c.get("training") or {}).get("width", 0)) for c in cards})
    split = cards[0].get("split") or {}
    kept_out = "kept out of" if split.get("pool_in_training") is False else "part of"
    pools = sorted({(int(n), int(h)) for n, h in zip(runs["clean_images"], runs["held_out"], strict=True)})
    pool_text = ", ".join(f"{n}-image clean pool ({n - h} to train on, {h} held out)" for n, h in pools)
    return (f"Setting: the demo suspects (Fashion-MNIST subset, PreAct-ResNet-18 width "
            f"{'/'.join(str(w) for w in widths)}, defense pool of {split.get('n_pool', '?')} images {kept_out} the "
            f"suspects' training, see `assets/demo/README.md`), a {pool_text}, every number measured on the whole demo "
            "test split (2,500 images; ASR and RA on the 2,250 non-target ones), 2 CPU cores.")


def render(results, csv_name: str, runs=None) -> str:
    from defenses import get_defense
    from runs.published import MISSING, published_for

    stale = int(runs.attrs.get("stale", 0)) if runs is not None else 0
    old_presets = int(runs.attrs.get("old_presets", 0)) if runs is not None else 0

    out = [*HEADER[:-1], HEADER[-1] + f" Per-run rows: [`{csv_name}`]({csv_name}).", "",
           (setting_text(runs) if runs is not None else "") + " Each cell is the mean ± "
           "sample sd over the seeds listed (the seed draws the pool and the defense's randomness). Presets were "
           "chosen on the development split (`scripts/tune_on_dev.py`), never on these numbers, except where a row is "
           "marked † (a `quick` preset set in round 1, partly with test-split runs, not yet re-derived); defenses never "
           "receive a test image (the runner seals the split). Seconds are the defense's wall time including the "
           "'after' measurement, on an otherwise idle machine."
           + (f" {stale} runs of the store, made on earlier weights of the demo suspects, are left out." if stale else "")
           + (f" {old_presets} runs made with an earlier version of a preset (before it was re-chosen) are left out."
              if old_presets else ""),
           "",
           "BA = clean test accuracy; drop = BA before - BA after; ASR = share of triggered non-target test images "
           "classified as the target; RA = their accuracy w.r.t. the true label; DER = [max(0, ASR0 - ASR1) - "
           "max(0, BA0 - BA1) + 1] / 2. **bold** = on the attack's Pareto front (no other row has a higher mean BA "
           "and a lower mean ASR; a row whose defense gave up at every seed, returning the suspect unchanged, is "
           "left out). *Published* numbers are on another setting (CIFAR-10, full-width ResNets): read "
           "them as what the method achieves where it was designed, not as a target for these models.", ""]
    out += ["## Goals (checked on the numbers below)", "", *goal_lines(results), ""]
    for attack, (before, g) in results.items():
        front = _front(g)
        out += [f"## {attack}", "",
                f"Suspect before any defense: BA {before['ba']:.3f}, ASR {before['asr']:.3f}, RA {before['ra']:.3f}.", "",
                "| defense | preset | seeds | BA | BA drop | ASR | RA | DER | seconds | published (BA / ASR, tag, setting) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for row in g.sort_values(["defense", "preset", "overrides"]).itertuples():
            title = get_defense(row.defense).title
            pub = published_for(row.defense, attack)
            pub_text = "; ".join(f"{p.ba:.3f} / {p.asr:.3f} [{p.tag}] {p.source}" + (f" ({p.note})" if p.note else "")
                                 for p in pub) or (f"none recorded: {MISSING[row.defense]}" if row.defense in MISSING
                                                   else "none recorded")
            preset = _label(row.preset, row.overrides)
            name = f"**{title}**" if (row.defense, preset) in front else title
            if row.preset == "quick" and row.defense not in DEV_CHOSEN:
                name += " †"
            if getattr(row, "n_failed", 0):
                name += f" (gave up at {row.n_failed} of {row.n_seeds} seeds: model unchanged)"
            out.append(f"| {name} | {preset} | {row.n_seeds} | {mean_sd_text(row.ba_mean, row.ba_sd)} | "
                       f"{mean_sd_text(row.drop_mean, row.drop_sd)} | {mean_sd_text(row.asr_mean, row.asr_sd)} | "
                       f"{mean_sd_text(row.ra_mean, row.ra_sd)} | {mean_sd_text(row.der_mean, row.der_sd)} | "
                       f"{mean_sd_text(row.seconds_mean, row.seconds_sd, 0)} | {pub_text} |")
        out.append("")
    return "\n".join(out) + "\n"


def capacity_section(root: Path) -> list[str]:
    """The capacity study's table (``scripts/capacity_study.py``), when it has results."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from capacity_study import load_results, summary

    df = load_results(root)
    if df is None:
        return []
    table = summary(df)
    widths = sorted(table["width"].unique())
    trained = []
    for card_file in sorted((root / "suspects").glob("*/suspect.json")):
        card = json.loads(card_file.read_text())
        m, t = card.get("metrics") or {}, card.get("training") or {}
        trained.append(f"| {card.get('name')} | {t.get('width')} | {m.get('ba', float('nan')):.4f} | "
                       f"{m.get('asr', float('nan')):.4f} | {t.get('seconds', float('nan')):.0f} |")
    out = ["## Capacity: does a wider demo model let the defenses work?", "",
           "`python scripts/capacity_study.py train|defend`: BadNets and Blended suspects trained with the demo recipe "
           "at each width, the defense pool (10%) kept out of training, each defense run with seeds 0-2 and measured "
           "on the **development split** (2,000 Fashion-MNIST images the demo never used), never the test split. "
           "Cells: BA drop / ASR (mean ± sd over the seeds), seconds.", "",
           *(["Suspects (test split; training seconds on 2 CPU cores):", "",
              "| suspect | width | BA | ASR | training seconds |", "|---|---|---|---|---|", *trained, ""]
             if trained else []),
           "| attack | defense | preset | " + " | ".join(f"width {w}" for w in widths) + " |",
           "|---|---|---|" + "---|" * len(widths)]
    keys = df[["attack", "defense", "preset"]].drop_duplicates().sort_values(["attack", "defense", "preset"])
    for attack, defense, preset in keys.itertuples(index=False):
        g = table[(table["attack"] == attack) & (table["defense"] == defense) & (table["preset"] == preset)]
        cells = []
        for w in widths:
            r = g[g["width"] == w]
            if r.empty:
                errors = df[(df["attack"] == attack) & (df["defense"] == defense) & (df["preset"] == preset)
                            & (df["width"] == w)] if "error" in df else df.iloc[0:0]
                errors = errors[errors["error"].notna()] if len(errors) else errors
                cells.append(f"refused or failed ({len(errors)}x): {str(errors['error'].iloc[0])[:80]}"
                             if len(errors) else "not run")
                continue
            r = r.iloc[0]
            cells.append(f"{mean_sd_text(r.drop_mean, r.drop_sd)} / {mean_sd_text(r.asr_mean, r.asr_sd)}, {r.seconds:.0f} s (n={r.n})")
        out.append(f"| {attack} | {defense} | {preset} | " + " | ".join(cells) + " |")
    return [*out, ""]


def write_doc(args: argparse.Namespace) -> int:
    from runs.store import RunStore

    store = RunStore(args.runs)
    results, runs = collect(store)
    capacity = capacity_section(Path(args.runs) / "capacity")
    out = Path(args.out)
    if not results:
        stale = int(runs.attrs.get("stale", 0))
        old = int(runs.attrs.get("old_presets", 0))
        left_out = []
        if stale:
            left_out.append(f"{stale} on earlier weights")
        if old:
            left_out.append(f"{old} with an earlier version of a preset")
        print(f"no finished benchmark runs on the current demo suspects in {args.runs}"
              + (f" ({', '.join(left_out)})" if left_out else "") + ": run `python scripts/benchmark.py run` first",
              file=sys.stderr)
        if not capacity:
            return 2
        out.write_text("\n".join([
            *HEADER, "",
            "**No benchmark runs on the current demo suspects yet** (`python scripts/benchmark.py run` fills them)"
            + (f"; the store's {stale} runs were made on earlier weights of the demo suspects and are left out"
               if stale else "") + ".", "", *capacity]))
        print(f"wrote {out} (the capacity study only)")
        return 0
    csv = out.with_name(out.stem + "-runs.csv")
    keep = ["attack", "defense", "preset", "overrides", "seed", "ba_before", "ba", "ba_drop", "asr_before", "asr", "ra", "der",
            "seconds", "failed", "device", "clean_images", "held_out", "date", "run_id"]
    runs[keep].sort_values(["attack", "defense", "preset", "seed"]).to_csv(csv, index=False, float_format="%.4f")
    text = render(results, csv.name, runs)
    if capacity:
        text += "\n" + "\n".join(capacity)
    out.write_text(text)
    print(f"wrote {out} ({sum(len(g) for _, g in results.values())} groups, {len(runs)} runs) and {csv}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("run", "write", "all"))
    ap.add_argument("--runs", default="bench-runs", help="the benchmark's run store (default ./bench-runs)")
    ap.add_argument("--out", default=str(DOC))
    ap.add_argument("--defenses", default="", help="comma-separated (default: every registered defense)")
    ap.add_argument("--suspects", default=",".join(ATTACKS))
    ap.add_argument("--presets", default="quick,paper")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell")
    ap.add_argument("--pool-size", type=int, help="clean pool images per run (default: the suspect's pool, <= 1000)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="run with a parameter override (a separate row in the document, labelled with it)")
    args = ap.parse_args(argv)
    status = 0
    if args.action in ("run", "all"):
        status = run_grid(args)
    if args.action in ("write", "all"):
        status = write_doc(args) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
