"""Input screening on the demo suspects: AUROC, TPR at the pool-chosen threshold, and the time of a full screen
of the test split (a benchmark, not a test).

    OMP_NUM_THREADS=2 python scripts/bench_screening.py --suspects badnets --methods strip [--preset quick]

Each (suspect, method) pair is one full screen: fit and calibrate on the 500 clean defense-pool images, then
score the 2,500 clean test images and the 2,250 triggered ones (all-to-one: target-class images left out). Prints
one markdown table row per pair: AUROC, TPR at the threshold, FPR observed on clean test, wall seconds (goal
<= 60 on 2 CPU cores) and the process's CPU seconds (wall is inflated when other jobs share the cores).
Then the time of one uploaded image scored with the stored calibration (goal <= 1 s).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suspects", default="badnets,blended,sig,wanet")
    ap.add_argument("--methods", default="strip,scale-up,ibd-psc")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()

    import torch
    from PIL import Image

    import suspects
    from analysis.screening import screen_images, screen_suspect
    from suspects.device import prepare_model

    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, preset {args.preset}")
    print("| suspect | method | AUROC | TPR at threshold | FPR on clean test | wall s | CPU s | 1 image s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.suspects.split(","):
        suspect = suspects.load(f"demo:{name}")
        prepare_model(suspect.model, "cpu")
        suspect.test, suspect.defense_pool  # noqa: B018 (load the data outside the timed region)
        for method in args.methods.split(","):
            cpu0, t0 = time.process_time(), time.perf_counter()
            r = screen_suspect(suspect, method, preset=args.preset)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            with tempfile.TemporaryDirectory() as tmp:
                x = suspect.trigger(suspect.test.images([1]))[0]
                path = Path(tmp) / "upload.png"
                Image.fromarray((x[0] * 255).round().byte().numpy(), "L").save(path)
                t1 = time.perf_counter()
                screen_images(suspect, method, [path], calibration=r.calibration)
                one = time.perf_counter() - t1
            print(f"| {name} | {method} | {r.auroc:.4f} | {r.tpr_at_fpr:.3f} | {r.fpr:.3f} | {wall:.1f} | "
                  f"{cpu:.1f} | {one:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
