"""Estimate how long a Neural Cleanse scan with a budget takes on this machine, without running it in full.

    OMP_NUM_THREADS=1 python scripts/estimate_scan_time.py --arch preact_resnet18 --width 64 --size 32

Builds the (untrained) architecture, and after a warm-up times ``reverse_engineer_class`` for one class with a short
and a longer budget on random images, and extrapolates linearly: per class = fixed part (set-up, measuring the kept
mask on the scan images) + epochs x time per epoch; the whole budget is assumed to run (no early stop), its worst
case. Prints the estimate from wall time and from CPU time: on a machine shared with other jobs the wall time counts
waiting; with one thread the CPU time is what the scan takes alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from analysis.reverse import ScanConfig, reverse_engineer_class  # noqa: E402
from suspects.models import create_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="preact_resnet18")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="input height and width")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--short", type=int, default=2, help="epochs of the short timing run")
    ap.add_argument("--long", type=int, default=8, help="epochs of the long timing run")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model = create_model(args.arch, num_classes=args.classes, width=args.width, in_channels=args.channels).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    config = ScanConfig()
    n = int(config.n_images * (args.classes - 1) / args.classes)  # the scan images of the other classes
    x = torch.rand(n, args.channels, args.size, args.size)
    reverse_engineer_class(model, x, 0, replace(config, steps=1))  # warm-up: first calls set up the kernels
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}
    for epochs in (args.short, args.long):
        t0, c0 = time.perf_counter(), time.process_time()
        r = reverse_engineer_class(model, x, 0, replace(config, steps=epochs, early_stop_patience=10**5))
        wall[epochs], cpu[epochs] = time.perf_counter() - t0, time.process_time() - c0
        assert r.epochs == epochs
    print(f"{args.arch} width {args.width}, {args.channels}x{args.size}x{args.size}, {args.classes} classes, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"default budget: {config.steps} epochs x {config.mini_batches} batches x {config.batch_size} images "
          f"= {config.images_per_class} stamped images per class, {config.n_images} scan images")
    # wall time counts waiting for the CPU when other jobs share it; CPU time (all threads) does not
    for label, t in (("wall", wall), ("CPU", cpu)):
        per_epoch = (t[args.long] - t[args.short]) / (args.long - args.short)
        fixed = max(0.0, t[args.short] - args.short * per_epoch)
        per_class = fixed + config.steps * per_epoch
        total = args.classes * per_class
        print(f"{label:>4} time: {per_epoch:.3f} s per epoch ({per_epoch / config.mini_batches * 1000:.0f} ms per "
              f"Adam step), {fixed:.1f} s fixed per class -> {per_class:.0f} s per class, {total:.0f} s = "
              f"{total / 60:.1f} min for the scan (no early stop)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
