"""``backdoor-lens defend``: run a defense on a suspect in the foreground; the repaired model and its report go to
the run store."""

from __future__ import annotations

import argparse
import os
import sys

from backdoor_lens.cli import TqdmProgress, add_runs_flag, parse_sets, print_json

ORDER = 40


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("defend", help="run a defense on a suspect and store the repaired model",
                              description="Run a defense (see `backdoor-lens defenses`) on a suspect; the repaired "
                                          "model and its report go to the run store.")
    p.add_argument("defense", help="defense name")
    p.add_argument("suspect", help="suspect folder or demo:NAME")
    p.add_argument("--preset", default="quick", help="quick (CPU demo) or paper (official settings)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a parameter, repeatable")
    p.add_argument("--pool-size", type=int, default=500, help="clean defense-pool images to use (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run N times with seeds SEED..SEED+N-1 and report mean ± sd of BA / ASR / RA / DER")
    add_runs_flag(p)
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.seeds == 1:
        return _run_one(args, args.seed)
    from runs.compare import format_groups, group_runs, groups_records, runs_table
    from runs.store import RunStore

    ids, status = [], 0
    for seed in range(args.seed, args.seed + args.seeds):
        code, run_id = _run_one(args, seed, summary=False)
        status = max(status, code)
        if run_id is not None:
            ids.append(run_id)
        if code != 0:
            break
    table = runs_table(RunStore(args.runs), args.suspect)
    table = table[table["run_id"].isin(ids)]
    groups = group_runs(table)
    if args.json:
        print_json({"runs": ids, "groups": groups_records(groups)})
    elif not table.empty:
        print(f"{len(ids)} run(s) of {args.defense} on {args.suspect}, seeds {args.seed}..{args.seed + args.seeds - 1}")
        print(format_groups(groups))
    return status


def _run_one(args: argparse.Namespace, seed: int, summary: bool = True):
    """One run with ``seed``; returns the exit code (and, with ``summary=False``, the run id; nothing printed)."""
    from defenses.base import Cancelled
    from defenses.registry import get_defense
    from runs.jobs import create_run, device_lock, execute
    from runs.store import RunStore

    defense = get_defense(args.defense)
    store = RunStore(args.runs)
    with device_lock(store, args.device, wait=True):
        # nonsense is refused here, before a run is recorded or anything runs
        run_id = create_run(store, args.defense, args.suspect, args.preset, parse_sets(args.set), args.pool_size,
                            seed, args.device, pid=os.getpid())
        bar = TqdmProgress(f"{args.defense}", disable=args.quiet or args.json)
        try:
            status = execute(store, run_id, args.device, progress_hook=bar)
        except (KeyboardInterrupt, Cancelled):
            store.fail(run_id, "cancelled by the user", status="cancelled")
            status = "cancelled"
        finally:
            bar.close()
    rec = store.get(run_id)
    if status != "finished":
        print(f"backdoor-lens defend: run {run_id} {status}: {rec.error}", file=sys.stderr)
        return 1 if summary else (1, None)
    if not summary:
        return 0, run_id
    report = store.report(run_id)
    if args.json:
        print_json({k: v for k, v in report.items() if k != "metric_definitions"})
        return 0
    print(f"{defense.title} on {args.suspect} ({report['device']}, {report['seconds']:.1f} s) -> {report['run_dir']}")
    for key, label in (("ba", "BA"), ("asr", "ASR"), ("ra", "RA")):
        before, after = report.get(f"{key}_before"), report.get(key)
        if after is not None:
            print(f"  {label:4s} {before:.4f} -> {after:.4f}")
    if report.get("der") is not None:
        print(f"  DER  {report['der']:.4f}   ((max(0, dASR) - max(0, dBA)) + 1) / 2")
    return 0
