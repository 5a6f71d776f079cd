"""Try defense settings on a development split, never on the test split (preset design, not a test).

    python scripts/tune_on_dev.py DEFENSE SUSPECT [--set name=value ...] [--preset quick] [--images 2000] [--seed 0]

The development split is ``--images`` Fashion-MNIST training images that the demo bundle never used (neither
for training the demo suspects nor in its test split), drawn with a fixed seed; it needs the full
Fashion-MNIST (Debian: ``apt-get install dataset-fashion-mnist``). Prints BA and ASR on that split before and
after the defense, its seconds, and the defense's main artifacts. The presets' deviations in ``defenses/`` cite
numbers measured with this script.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("suspect", help="demo suspect name (badnets, blended, sig, wanet) or a suspect reference")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="parameter override")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--pool-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="the defense run's seed (its pool draw and randomness)")
    args = ap.parse_args()

    import suspects
    from backdoor_lens.cli import parse_sets
    from defenses import run_defense
    from suspects.metrics import evaluate

    ref = args.suspect if ":" in args.suspect or "/" in args.suspect else f"demo:{args.suspect}"
    sus = suspects.load(ref)
    dev = development_split(args.images)
    overrides = parse_sets(args.set)
    t = time.time()
    report = run_defense(args.defense, sus, args.preset, overrides, pool_size=args.pool_size, suspect_ref=ref,
                         seed=args.seed)
    before = evaluate(sus.model, dev, sus.trigger)
    after = evaluate(report.suspect.model, dev, sus.trigger)
    shown = {k: v for k, v in report["artifacts"].items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    print(f"{args.defense} {ref} {json.dumps(overrides)} seed {args.seed}: development BA {before.ba:.3f} -> {after.ba:.3f} "
          f"(drop {before.ba - after.ba:+.3f}), ASR {before.asr:.3f} -> {after.asr:.3f}, {time.time() - t:.0f} s")
    print("artifacts:", json.dumps(shown))


if __name__ == "__main__":
    main()
