"""The background worker: ``python -m runs.worker --runs ROOT [--device DEV]``, started by :func:`runs.jobs.ensure_worker`.

It runs the queued runs of the store one at a time under the device's lock (:func:`runs.jobs.run_queued`), then
the queued stress tests and the queued sweeps (:func:`runs.sweep.run_queued_sweeps`, which run on Ray), and exits
when the queues stay empty. On the CPU it takes all cores but one (:func:`suspects.device.cpu_threads`).
"""

from __future__ import annotations

import argparse
import sys
import time

from suspects.device import apply_cpu_threads

from .jobs import device_lock, run_queued
from .store import RunStore
from .stress import queued_stress
from .sweep import queued_sweeps, run_queued_sweeps

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Backdoor Lens defense worker (started by the dashboard).")
    ap.add_argument("--runs", required=True)
    ap.add_argument("--device")
    args = ap.parse_args(argv)
    apply_cpu_threads("worker")  # all cores but one: the dashboard computes with the one left (issue 12.4)
    store = RunStore(args.runs)
    while True:
        run_queued(store, args.device)
        with device_lock(store, args.device, wait=False) as free:
            if free:
                run_queued_sweeps(store)
        time.sleep(0.5)  # a run queued while the lock was being released is picked up here
        if not store.list(status="queued") and not queued_stress(store) and not queued_sweeps(store):
            return 0
        with device_lock(store, args.device, wait=False) as free:
            if not free:
                return 0


if __name__ == "__main__":
    sys.exit(main())
