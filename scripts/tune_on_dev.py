"""Try defense settings on a development split, never on the test split (preset design, not a test).

    python scripts/tune_on_dev.py DEFENSE SUSPECT[,SUSPECT...] [--set name=value ...] [--preset quick]
                                  [--images 2000] [--seed 0 | --seeds 3] [--log trials.jsonl]

The development split is ``--images`` Fashion-MNIST training images that the demo bundle never used (neither
for training the demo suspects nor in its test split), drawn with a fixed seed; it needs the full
Fashion-MNIST (Debian: ``apt-get install dataset-fashion-mnist``). Prints BA and ASR on that split before and
after the defense, its seconds, and the defense's main artifacts; ``--seeds N`` runs seeds 0..N-1 and prints the
mean +- sd of the BA drop and ASR per suspect, ``--log`` appends one JSON line per run. The presets' deviations in
``defenses/`` cite numbers measured with this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")


def development_split(n: int, seed: int = 123):
    """``n`` Fashion-MNIST training images outside the demo bundle (its train and test sources)."""
    import numpy as np
    import torch

    from suspects.data import DEMO_DATA, load_dataset

    full = load_dataset({"name": "fashion-mnist"})
    free = np.setdiff1d(np.arange(len(full.train)), np.load(DEMO_DATA)["train_source_index"])
    pick = np.random.default_rng(seed).choice(free, n, replace=False)
    return full.train.subset(torch.as_tensor(pick), "development")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("defense")
    ap.add_argument("suspect", help="demo suspect names (badnets, blended, sig, wanet) or suspect references, "
                    "comma-separated")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="parameter override")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--pool-size", type=int, help="clean pool images (default: the suspect's pool, <= 1000)")
    ap.add_argument("--seed", type=int, default=0, help="the defense's seed (pool draw, initialisation, batches)")
    ap.add_argument("--seeds", type=int, default=0, help="run seeds 0..N-1 instead of --seed, and summarise")
    ap.add_argument("--log", type=Path, help="append one JSON line per run to this file")
    args = ap.parse_args()

    import suspects
    from backdoor_lens.cli import parse_sets
    from defenses import run_defense
    from suspects.metrics import evaluate

    dev = development_split(args.images)
    overrides = parse_sets(args.set)
    seeds = list(range(args.seeds)) if args.seeds else [args.seed]
    for name in [n for n in args.suspect.split(",") if n]:
        ref = name if ":" in name or "/" in name else f"demo:{name}"
        sus = suspects.load(ref)
        before = evaluate(sus.model, dev, sus.trigger)
        drops, asrs, secs = [], [], []
        for seed in seeds:
            t = time.time()
            report = run_defense(args.defense, sus, args.preset, overrides, pool_size=args.pool_size, suspect_ref=ref,
                                 seed=seed)
            after = evaluate(report.suspect.model, dev, sus.trigger)
            seconds = time.time() - t
            drops.append(before.ba - after.ba)
            asrs.append(after.asr)
            secs.append(seconds)
            shown = {k: v for k, v in report["artifacts"].items()
                     if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
            print(f"{args.defense} {ref} {args.preset} {json.dumps(overrides)} seed {seed}: development BA "
                  f"{before.ba:.3f} -> {after.ba:.3f} (drop {before.ba - after.ba:+.3f}), ASR {before.asr:.3f} -> "
                  f"{after.asr:.3f}, {seconds:.0f} s", flush=True)
            print("artifacts:", json.dumps(shown), flush=True)
            if args.log:
                row = {"defense": args.defense, "suspect": ref, "preset": args.preset, "overrides": overrides,
                       "seed": seed, "pool_size": args.pool_size, "dev_images": args.images,
                       "dev_ba_before": before.ba, "dev_asr_before": before.asr, "dev_ba": after.ba,
                       "dev_asr": after.asr, "seconds": round(seconds, 1)}
                with args.log.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
        if len(seeds) > 1:
            print(f"SUMMARY {args.defense} {ref} {args.preset} {json.dumps(overrides)} seeds {len(seeds)}: BA drop "
                  f"{statistics.mean(drops):.3f} +- {statistics.stdev(drops):.3f}, ASR {statistics.mean(asrs):.3f} "
                  f"+- {statistics.stdev(asrs):.3f}, {statistics.mean(secs):.0f} s", flush=True)

if __name__ == "__main__":
    main()
