"""``backdoor-lens compare``: every finished defense run of a suspect as a table (BA, ASR, RA, DER, Pareto front)."""

from __future__ import annotations

import argparse
import json
import sys

from backdoor_lens.cli import add_runs_flag

ORDER = 70


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="table of every stored run of a suspect (BA, ASR, RA, DER, Pareto front)",
                              description="Print every finished defense run of SUSPECT in the run store: defense, "
                                          "preset, BA, ASR, RA, DER, seconds, device, clean data used, date; * marks "
                                          "the Pareto front (no other run has a BA at least as high and an ASR at "
                                          "least as low).")
    p.add_argument("suspect", help="the model whose runs to list: demo:NAME, a folder, an upload or a run id (its "
                                   "repaired model: the parent's runs are listed too). One model has one history "
                                   "under all its names (its weights' and data's fingerprint)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON: the rows with every column's definition")
    fmt.add_argument("--csv", action="store_true", help="CSV, one row per run")
    p.add_argument("--backdoorbench", action="store_true",
                   help="with --csv: one row per (defense, preset, overrides) in the columns of BackdoorBench's "
                        "leaderboard (attack, defense, model, dataset, pratio, clean_acc, asr, ra; percent) plus "
                        "sd, DER, n and seconds")
    p.add_argument("--defense", action="append", metavar="NAME", help="only this defense (repeatable)")
    p.add_argument("--preset", action="append", metavar="NAME", help="only this preset (repeatable)")
    add_runs_flag(p)
    p.set_defaults(func=run)


def _family(store, ref: str):
    """The model ``ref`` names and its family (None when it cannot be loaded: its runs are then found by name)."""
    import suspects
    from runs.identity import family

    try:
        suspect = suspects.load(ref)
    except suspects.SuspectLoadError:
        return None, None
    return suspect, family(store, suspect, ref)


def run(args: argparse.Namespace) -> int:
    from runs.compare import (
        backdoorbench_csv,
        filter_runs,
        format_groups,
        format_table,
        group_runs,
        runs_table,
        table_csv,
        table_json,
    )
    from runs.identity import made_by_text, resolve_ref, short_ref
    from runs.store import RunStore

    if args.backdoorbench and not args.csv:
        raise ValueError("--backdoorbench goes with --csv")
    store = RunStore(args.runs)
    ref = resolve_ref(args.suspect, store)
    suspect, fam = _family(store, ref)
    name = short_ref(ref, store, suspect)
    trigger = suspect.trigger if suspect is not None else None  # ASR / RA are defined for its label mapping
    table = runs_table(store, records=fam.children) if fam is not None else runs_table(store, ref)
    siblings = runs_table(store, records=fam.siblings) if fam is not None and fam.repaired else None
    if args.defense or args.preset:
        table = filter_runs(table, defenses=args.defense, presets=args.preset)
        if siblings is not None:
            siblings = filter_runs(siblings, defenses=args.defense, presets=args.preset)
    if args.json:
        data = json.loads(table_json(table, name, trigger))
        if siblings is not None:
            data["family"] = {"made_by": fam.made_by.id, "parent": short_ref(fam.parent_ref or fam.made_by.suspect, store),
                              "siblings": json.loads(table_json(siblings, name))["runs"]}
        print(json.dumps(data, indent=2))
    elif args.csv and args.backdoorbench:
        print(backdoorbench_csv(group_runs(table), suspect.card if suspect is not None else {}), end="")
    elif args.csv:
        print(table_csv(table), end="")
    else:
        if siblings is not None:
            parent = short_ref(fam.parent_ref or fam.made_by.suspect, store)
            print(f"{name} is the repaired model of {made_by_text(fam, store)}.\n")
            print(f"{len(siblings)} finished run(s) of its parent {parent} in {store.root}, newest first\n")
            print(format_table(siblings, highlight=fam.made_by.id, trigger=trigger))
            print()
        if table.empty:
            print(f"no finished run of {name} in {store.root} (`backdoor-lens defend DEFENSE {name}` adds one)",
                  file=sys.stderr if siblings is None else sys.stdout)
        else:
            print(f"{len(table)} finished run(s) of {name} in {store.root}, newest first\n")
            print(format_table(table, trigger=trigger))
            groups = group_runs(table)
            if (groups["n_seeds"] > 1).any():
                print("\nGrouped by (defense, preset, overrides)\n" + format_groups(groups))
    return 0
