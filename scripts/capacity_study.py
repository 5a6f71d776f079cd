"""Does model capacity change what the post-training defenses can do? (issue 13, step 1; a study, not a test)

    python scripts/capacity_study.py train  [--widths 8,16,32] [--attacks badnets,blended]
    python scripts/capacity_study.py defend [--widths 8,16,32] [--attacks badnets,blended]
                                            [--defenses awm,anp,finetune,fineprune,shortcut,linf_prune]
                                            [--presets quick,paper] [--seeds 3] [--pool-size 1000]
    python scripts/capacity_study.py table

``train`` trains BadNets and Blended suspects on the demo data with the demo recipe (PreAct-ResNet-18, 20 epochs,
batch 128, SGD lr 0.05 cosine, seed 0) at each width, with the defense pool (10% of the training split) kept out
of training. ``defend`` runs each defense and preset with seeds 0..N-1 and measures BA and ASR **on the development
split** (2,000 Fashion-MNIST training images the demo never used; ``scripts/tune_on_dev.py``), never on the test
split. Every result is one JSON line in ``ROOT/results.jsonl`` (resumable: finished cells are skipped);
``table`` prints mean +- sd per width, attack, defense and preset, and ``scripts/benchmark.py write`` puts the same
table into the benchmark document. Run it alone on the machine: the seconds are wall times.
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

ROOT = Path("bench-runs/capacity")
ATTACK_FLAGS = {
    "badnets": {"attack": "badnets", "attack_params": {}, "poison_rate": 0.1},
    "blended": {"attack": "blended", "attack_params": {"alpha": 0.2}, "poison_rate": 0.1},
}
DEFENSES = ("awm", "anp", "finetune", "fineprune", "shortcut", "linf_prune")


def suspect_dir(root: Path, width: int, attack: str) -> Path:
    return root / "suspects" / f"w{width}-{attack}"


def train(args: argparse.Namespace) -> None:
    from suspects.training import TrainConfig, train_suspect

    for width in args.widths:
        for attack in args.attacks:
            out = suspect_dir(args.root, width, attack)
            if (out / "suspect.json").is_file():
                print(f"width {width} {attack}: already trained ({out})")
                continue
            cfg = TrainConfig(data={"name": "demo"}, model="preact_resnet18", width=width, target=0, epochs=20,
                              batch_size=128, lr=0.05, pool_fraction=0.1, train_on_pool=False, seed=0,
                              name=f"w{width}-{attack}", **ATTACK_FLAGS[attack])
            t = time.time()
            s = train_suspect(cfg, out)
            m = s.card["metrics"]
            print(f"width {width} {attack}: BA {m['ba']:.4f} ASR {m['asr']:.4f}, {time.time() - t:.0f} s", flush=True)


def _done(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            keys.add((r["width"], r["attack"], r["defense"], r["preset"], r["seed"]))
    return keys


def defend(args: argparse.Namespace) -> None:
    import suspects
    from defenses import run_defense
    from scripts.tune_on_dev import development_split
    from suspects.metrics import evaluate

    dev = development_split(2000)
    results = args.root / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    done = _done(results)
    for width in args.widths:
        for attack in args.attacks:
            folder = suspect_dir(args.root, width, attack)
            if not (folder / "suspect.json").is_file():
                print(f"width {width} {attack}: not trained yet (run `train` first)", file=sys.stderr)
                continue
            sus = suspects.load(folder)
            before = evaluate(sus.model, dev, sus.trigger)
            for defense in args.defenses:
                for preset in args.presets:
                    for seed in range(args.seeds):
                        if (width, attack, defense, preset, seed) in done:
                            continue
                        t = time.time()
                        row = {"width": width, "attack": attack, "defense": defense, "preset": preset, "seed": seed,
                               "pool_size": args.pool_size, "dev_ba_before": before.ba, "dev_asr_before": before.asr}
                        try:
                            r = run_defense(defense, sus, preset, pool_size=args.pool_size, seed=seed,
                                            suspect_ref=str(folder), measure="subset:200")
                        except Exception as err:  # noqa: BLE001 - a study records the failure and goes on
                            row.update(error=str(err), seconds=round(time.time() - t, 1))
                        else:
                            after = evaluate(r.suspect.model, dev, sus.trigger)
                            row.update(dev_ba=after.ba, dev_asr=after.asr, seconds=r["seconds"],
                                       failed=bool((r["artifacts"] or {}).get("failed")))
                        with results.open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)


def load_results(root: Path = ROOT):
    """The study's rows (a DataFrame) or None when nothing ran yet."""
    import pandas as pd

    path = root / "results.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows) if rows else None


def summary(df):
    """Mean +- sd over seeds of the development-split BA drop and ASR, and seconds, per width/attack/defense/preset."""
    ok = df[df.get("error").isna()] if "error" in df else df
    ok = ok.assign(drop=ok["dev_ba_before"] - ok["dev_ba"])
    g = ok.groupby(["attack", "defense", "preset", "width"])
    out = g.agg(n=("seed", "count"), drop_mean=("drop", "mean"), drop_sd=("drop", "std"), asr_mean=("dev_asr", "mean"),
                asr_sd=("dev_asr", "std"), seconds=("seconds", "mean"), asr_before=("dev_asr_before", "first"),
                ba_before=("dev_ba_before", "first"))
    return out.reset_index()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("train", "defend", "table"))
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--widths", default="8,16,32")
    ap.add_argument("--attacks", default="badnets,blended")
    ap.add_argument("--defenses", default=",".join(DEFENSES))
    ap.add_argument("--presets", default="quick,paper")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pool-size", type=int, default=1000)
    args = ap.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",") if w]
    args.attacks = [a for a in args.attacks.split(",") if a]
    args.defenses = [d for d in args.defenses.split(",") if d]
    args.presets = [p for p in args.presets.split(",") if p]
    if args.action == "train":
        train(args)
    elif args.action == "defend":
        defend(args)
    else:
        df = load_results(args.root)
        if df is None:
            print("no results yet", file=sys.stderr)
            return 2
        print(summary(df).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
