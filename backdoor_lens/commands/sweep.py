"""``backdoor-lens sweep``: run a grid of defenses x suspects x presets x seeds on Ray and print mean ± sd."""

from __future__ import annotations

import argparse
import contextlib
import sys

from backdoor_lens.cli import add_runs_flag, parse_sets

ORDER = 45


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of defenses x suspects x presets x seeds on Ray",
                              description="Run every defense on every suspect with every preset and seed, one Ray "
                                          "task per cell (local Ray by default, --address for a cluster). Finished "
                                          "cells are skipped when the same sweep runs again. Ends with the runs "
                                          "grouped by (defense, preset, overrides): mean ± sd.")
    p.add_argument("grid", nargs="?", help="a TOML file with the same fields (defenses, suspects, presets, seeds, "
                                           "pool_size, [set.DEFENSE]); flags given too override its fields")
    p.add_argument("--defenses", help="comma-separated defense names, or all")
    p.add_argument("--suspects", help="comma-separated suspect references (demo:NAME, folders, imports)")
    p.add_argument("--presets", help="comma-separated presets (default quick)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, help="number of seeds: 0..N-1 (default 1)")
    seeds.add_argument("--seed-list", help="comma-separated seeds, e.g. 0,7,11")
    p.add_argument("--set", action="append", metavar="DEFENSE.NAME=VALUE",
                   help="override a defense's parameter, repeatable (e.g. finetune.epochs=1)")
    p.add_argument("--pool-size", type=int, help="clean defense-pool images per run (default: each suspect's pool, at most 1000)")
    p.add_argument("--address", help="an existing Ray cluster: auto, or ray://HOST:PORT (default: a local Ray)")
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: the machine's cores)")
    p.add_argument("--task-cpus", type=float, default=1, help="CPUs per cell, torch threads set to match (default 1)")
    p.add_argument("--gpus", choices=["auto", "yes", "no"], default="auto",
                   help="one GPU per cell: auto = when the cluster has GPUs")
    p.add_argument("--shared-paths", action="store_true",
                   help="workers load suspects from their paths (a disk the cluster shares) instead of Ray's "
                        "object store")
    p.add_argument("--max-retries", type=int, default=1, help="retries of a failed or killed cell (default 1)")
    add_runs_flag(p)
    p.add_argument("--json", action="store_true", help="print the sweep's result and groups as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace):
    """The :class:`runs.sweep.SweepSpec` of the command line (a TOML file, with flags overriding its fields)."""
    from runs.sweep import SweepSpec

    base = SweepSpec.from_toml(args.grid) if args.grid else None
    seeds = ([int(s) for s in args.seed_list.split(",") if s.strip()] if args.seed_list
             else args.seeds if args.seeds is not None else (base.seeds if base else None))
    sets = parse_sets(args.set)
    return SweepSpec.build(
        args.defenses or (base.defenses if base else []), args.suspects or (base.suspects if base else []),
        args.presets or (base.presets if base else None), seeds,
        overrides=base.overrides if base else None, sets=sets,
        pool_size=args.pool_size if args.pool_size is not None else (base.pool_size if base else None))


@contextlib.contextmanager
def local_device_lock(store, address: str | None):
    """A sweep on this machine (no ``--address``) holds the device lock of the store, as ``defend``, ``stress`` and
    the UI's worker do, so it never shares the cores or the GPU with another defense run of the same store."""
    from runs.jobs import device_lock

    if address is not None:
        yield
        return
    with device_lock(store, None, wait=False) as free:
        if free:
            yield
            return
    print("backdoor-lens sweep: another defense is running on this machine (same run store); waiting for it ...",
          file=sys.stderr, flush=True)
    with device_lock(store, None, wait=True):
        yield


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from backdoor_lens.cli import print_json
    from runs.compare import format_groups, group_runs, groups_records, runs_table
    from runs.store import RunStore
    from runs.sweep import run_sweep

    spec = spec_from_args(args)
    store = RunStore(args.runs)
    bar: list = []
    quiet = args.quiet or args.json

    def on_start(total: int, to_run: int) -> None:
        print(f"sweep {spec.id}: {total} cell(s) ({len(spec.defenses)} defense(s) x {len(spec.suspects)} "
              f"suspect(s) x {len(spec.presets)} preset(s) x {len(spec.seeds)} seed(s)); {to_run} to run, "
              f"{total - to_run} already done or refused", file=sys.stderr)
        bar.append(tqdm(total=to_run, desc="cells", unit="cell", disable=quiet, dynamic_ncols=True))

    def progress(done: int, to_run: int, cell, status: str) -> None:
        if bar:
            bar[0].update(1)
            if status != "finished":
                bar[0].write(f"failed: {cell.label()}")

    gpus = {"auto": None, "yes": True, "no": False}[args.gpus]
    try:
        with local_device_lock(store, args.address):
            result = run_sweep(spec, store, address=args.address, cpus=args.cpus, task_cpus=args.task_cpus,
                               gpus=gpus, shared_paths=args.shared_paths, max_retries=args.max_retries,
                               progress=progress, on_start=on_start)
    except KeyboardInterrupt:
        print(f"\nbackdoor-lens sweep: cancelled; the finished cells are kept (run the same sweep again to go on: "
              f"{spec.id})", file=sys.stderr)
        return 1
    finally:
        if bar:
            bar[0].close()
    table = {}
    for ref in spec.suspects:
        t = runs_table(store, ref)
        table[ref] = t[t["run_id"].isin(list(result.runs.values()))]
    if args.json:
        print_json({"sweep": result.sweep_id, "cells": result.total, "ran": len(result.runs) - len(result.skipped),
                    "skipped": len(result.skipped), "failed": result.failed, "seconds": result.seconds,
                    "groups": {ref: groups_records(group_runs(t)) for ref, t in table.items()}})
    else:
        print(f"sweep {result.sweep_id}: {len(result.runs) - len(result.skipped)} ran, {len(result.skipped)} skipped "
              f"(done before), {len(result.failed)} failed, {result.seconds:.1f} s")
        for err in result.failed.values():
            print(f"  failed {err.splitlines()[0] if err else ''}")
        for ref, t in table.items():
            if not t.empty:
                print(f"\n{ref}\n" + format_groups(group_runs(t)))
    return 1 if result.failed else 0
