"""``backdoor-lens defend``: run a defense on a suspect in the foreground; the repaired model and its report go to
the run store."""

from __future__ import annotations

import argparse
import os
import sys

from backdoor_lens.cli import (
    TqdmProgress,
    add_checkpoint_args,
    add_runs_flag,
    parse_sets,
    print_json,
    suspect_reference,
)

ORDER = 40


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("defend", help="run a defense on a suspect and store the repaired model",
                              description="Run a defense (see `backdoor-lens defenses`) on a suspect; the repaired "
                                          "model and its report go to the run store.")
    p.add_argument("defense", help="defense name")
    p.add_argument("suspect", help="suspect folder, demo:NAME, a run id (its repaired model), or a checkpoint "
                                   "(.safetensors/.pt/.pth) with --arch")
    add_checkpoint_args(p)
    p.add_argument("--preset", default="quick", help="quick (CPU demo) or paper (official settings)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a parameter, repeatable")
    p.add_argument("--pool-size", type=int,
                   help="clean defense-pool images to use (default: the suspect's whole pool, at most 1000; 30%% of "
                        "them are held out for the defense's stopping and selection rules)")
    # (the numbers are defenses.runner.DEFAULT_POOL_SIZE / HELD_OUT_FRACTION, not imported: the CLI starts without torch)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run N times with seeds SEED..SEED+N-1 and report mean ± sd of BA / ASR / RA / DER")
    add_runs_flag(p)
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--measure", default="auto", metavar="auto|full|subset:N",
                   help="measure 'after' on the whole test split (full), on N random test images (subset:N), or "
                        "auto (default): the whole split up to 5,000 images, else 2,000 random ones; a 95%% interval "
                        "either way. 'before' comes from the suspect's card when it holds metrics for the same "
                        "weights and data")
    p.add_argument("--no-estimate", action="store_true",
                   help="do not time a training step to estimate the wall time before starting")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import suspects
    from runs.identity import resolve_ref

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    args.suspect = resolve_ref(args.suspect, root=args.runs)  # a run id names its repaired model
    args.suspect = suspect_reference(args)  # a checkpoint file is kept as a suspect folder the run can name
    suspect = suspects.load(args.suspect)  # once: validation, the estimates and every seed's run share it
    if args.seeds == 1:
        return _run_one(args, args.seed, suspect)
    from runs.compare import format_groups, group_runs, groups_records, runs_table
    from runs.store import RunStore

    ids, status = [], 0
    for seed in range(args.seed, args.seed + args.seeds):
        code, run_id = _run_one(args, seed, suspect, summary=False)
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


def _run_one(args: argparse.Namespace, seed: int, suspect, summary: bool = True):
    """One run with ``seed``; returns the exit code (and, with ``summary=False``, the run id; nothing printed)."""
    from defenses.base import Cancelled
    from defenses.registry import get_defense
    from defenses.runner import FULL_SPLIT
    from runs.jobs import create_run, device_lock, execute
    from runs.store import RunStore
    from runs.timing import expected_time

    defense = get_defense(args.defense)
    store = RunStore(args.runs)
    overrides = parse_sets(args.set)
    with device_lock(store, args.device, wait=True):
        # nonsense is refused here, before a run is recorded or anything runs
        run_id = create_run(store, args.defense, args.suspect, args.preset, overrides, args.pool_size,
                            seed, args.device, pid=os.getpid(), measure=args.measure, suspect=suspect)
        if not args.quiet:
            expected = expected_time(store, args.defense, args.preset, overrides, suspect, args.suspect,
                                     args.pool_size, args.device, args.measure, estimate=not args.no_estimate)
            print(f"{defense.title}, preset {args.preset}, seed {seed}: {expected.text()}", file=sys.stderr,
                  flush=True)
        bar = TqdmProgress(f"{args.defense}", disable=args.quiet or args.json)
        try:
            status = execute(store, run_id, args.device, progress_hook=bar, suspect=suspect)
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
    ci = report.get("ci95") or {}
    print(f"  before: {'from the card (same weights and data)' if report.get('before_source') == 'card' else 'measured'}"
          f"; after: measured on {report.get('measured_on', 'the whole test split')}")
    if report.get("measured_on", FULL_SPLIT) != FULL_SPLIT:
        print("  (a random subset, to answer sooner on a large test split: --measure full measures all of it)")
    for key, label in (("ba", "BA"), ("asr", "ASR"), ("ra", "RA")):
        before, after = report.get(f"{key}_before"), report.get(key)
        if after is not None:
            interval = f"   (95% CI {ci[key][0]:.4f}-{ci[key][1]:.4f})" if ci.get(key) else ""
            print(f"  {label:4s} {before:.4f} -> {after:.4f}{interval}")
    if report.get("der") is not None:
        print(f"  DER  {report['der']:.4f}   ((max(0, dASR) - max(0, dBA)) + 1) / 2")
    if (report.get("artifacts") or {}).get("failed"):
        print(f"  the defense FAILED: {report['artifacts'].get('reason', 'no reason given')}")
    return 0
