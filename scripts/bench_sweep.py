"""Benchmark: the tiny sweep grid on a local Ray vs. the same cells one after the other in one process.

    OMP_NUM_THREADS=1 python scripts/bench_sweep.py [--cpus 2] [--json out.json]

Grid: finetune (1 epoch) and linf_prune (max_ratio 0.1) x demo:badnets x seeds 0, 1, pool of 50 images: the grid of
tests/test_sweep.py. Sequential: ``run_defense`` per cell with one torch thread, the suspect loaded once. Ray: a
fresh run store and a fresh local Ray with ``--cpus`` CPUs (start-up included), one-thread tasks, each finished run
written to the store by the driver. Reported: both wall times, their ratio, Ray's start-up, and Ray's overhead =
Ray's wall time minus the ideal split of the sequential time over ``--cpus`` tasks at a time, as a share of the
sequential time. Check ``uptime`` first: the numbers mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

GRID = {"defenses": "finetune,linf_prune", "suspects": ["demo:badnets"], "seeds": 2,
        "sets": {"finetune.steps": 1, "linf_prune.max_ratio": 0.1}, "pool_size": 50}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--finetune-steps", type=int, default=GRID["sets"]["finetune.steps"],
                    help="fine-tuning steps per cell (default: the test grid's 1; larger cells show the scaling)")
    ap.add_argument("--pool-size", type=int, default=GRID["pool_size"], help="clean pool images per cell")
    args = ap.parse_args(argv)
    GRID["sets"]["finetune.steps"] = args.finetune_steps
    GRID["pool_size"] = args.pool_size

    import suspects
    from defenses.runner import run_defense
    from runs.store import RunStore
    from runs.sweep import SweepSpec, run_sweep

    spec = SweepSpec.build(GRID["defenses"], GRID["suspects"], "quick", GRID["seeds"], sets=GRID["sets"],
                           pool_size=GRID["pool_size"])
    load = os.getloadavg()[0]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loaded = {ref: suspects.load(ref) for ref in spec.suspects}
    cell_seconds = []
    for cell in spec.cells():
        c0 = time.perf_counter()
        run_defense(cell.defense, loaded[cell.suspect], cell.preset, cell.overrides, pool_size=cell.pool_size,
                    seed=cell.seed, device="cpu")
        cell_seconds.append(time.perf_counter() - c0)
    sequential = time.perf_counter() - t0

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        startup: list[float] = []
        t0 = time.perf_counter()
        result = run_sweep(spec, store, cpus=args.cpus, task_cpus=1,
                           on_start=lambda total, to_run: startup.append(time.perf_counter()))
        ray_wall = time.perf_counter() - t0
        assert not result.failed and len(result.runs) == spec.size(), result
    r0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_startup = time.perf_counter() - r0
    ray.shutdown()
    ideal = sequential / args.cpus
    out = {"cells": spec.size(), "cpus": args.cpus, "load_before": round(load, 2),
           "sequential_s": round(sequential, 1), "cell_seconds": [round(s, 1) for s in cell_seconds],
           "ray_s": round(ray_wall, 1), "ratio": round(ray_wall / sequential, 3),
           "ray_startup_s": round(ray_startup, 1), "overhead_s": round(ray_wall - ideal, 1),
           "overhead_share": round((ray_wall - ideal) / sequential, 3),
           "load_after": round(os.getloadavg()[0], 2)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
