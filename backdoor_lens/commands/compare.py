"""``backdoor-lens compare``: every finished defense run of a suspect as a table (BA, ASR, RA, DER, Pareto front)."""

from __future__ import annotations

import argparse
import sys

from backdoor_lens.cli import add_runs_flag

ORDER = 70


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="table of every stored run of a suspect (BA, ASR, RA, DER, Pareto front)",
                              description="Print every finished defense run of SUSPECT in the run store: defense, "
                                          "preset, BA, ASR, RA, DER, seconds, device, clean data used, date; * marks "
                                          "the Pareto front (no other run has a BA at least as high and an ASR at "
                                          "least as low).")
    p.add_argument("suspect", help="the suspect the runs were made on (demo:NAME or a folder)")
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
    from runs.store import RunStore

    if args.backdoorbench and not args.csv:
        raise ValueError("--backdoorbench goes with --csv")
    store = RunStore(args.runs)
    table = runs_table(store, args.suspect)
    if args.defense or args.preset:
        table = filter_runs(table, defenses=args.defense, presets=args.preset)
    if args.json:
        print(table_json(table, args.suspect))
    elif args.csv and args.backdoorbench:
        import suspects

        print(backdoorbench_csv(group_runs(table), suspects.load(args.suspect).card), end="")
    elif args.csv:
        print(table_csv(table), end="")
    elif table.empty:
        print(f"no finished run of {args.suspect} in {store.root} (`backdoor-lens defend DEFENSE {args.suspect}` "
              "adds one)", file=sys.stderr)
    else:
        print(f"{len(table)} finished run(s) of {args.suspect} in {store.root}, newest first\n")
        print(format_table(table))
        groups = group_runs(table)
        if (groups["n_seeds"] > 1).any():
            print("\nGrouped by (defense, preset, overrides)\n" + format_groups(groups))
    return 0
