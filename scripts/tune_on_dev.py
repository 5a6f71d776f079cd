"""Try defense settings on development suspects, never on a test suspect (preset design, not a test).

    python scripts/tune_on_dev.py DEFENSE SUSPECT[,SUSPECT...] [--set name=value ...] [--preset quick]
                                  [--seed 1000 | --seeds 3] [--images N] [--log docs/dev-trials.jsonl] [--note TEXT]

SUSPECT is an attack name (``badnets``: every built development suspect of that attack in the zoo,
``zoo:badnets-dev-s10`` ...), a development suspect's ``zoo:NAME``, or a suspect folder. Test suspects are refused
with one line, before anything runs: any zoo suspect of role ``test``, any demo bundle suspect (``demo:NAME`` or its
folder) and any weights whose fingerprint is a test suspect's (``suspects.zoo.test_suspect_reason``); so is a suspect
measured on the demo bundle's data, whose test split is the benchmark's (docs/zoo.md).

Each development suspect is measured on its own evaluation split (``fashion-mnist-dev``: 2,500 Fashion-MNIST
training images that neither the bundle nor the suspect trains on; ``--images N``: N random ones of them) and the
defense gets the suspect's own defense pool. Defense seeds start at 1000 (``--seed``, ``--seeds N`` runs
1000..1000+N-1): the benchmark uses 0-2, so no pool draw or initialisation of a tuning trial is one of the
benchmark's. Every trial is appended to ``docs/dev-trials.jsonl`` (``--log``): suspect and fingerprint, defense seed,
preset, overrides, parameters, BA / ASR / RA before and after, seconds and the machine. Prints the same, and with
``--seeds N`` the mean +- sd of the BA drop and ASR per suspect.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")

DEV_SEED_BASE = 1000  # tuning seeds start here; the benchmark's are 0, 1, 2
DEFAULT_LOG = Path(__file__).resolve().parent.parent / "docs" / "dev-trials.jsonl"


class Refused(ValueError):
    """A suspect tuning may not use (a test suspect, or one measured on the bundle's test split)."""


def expand(names: str) -> list[str]:
    """Suspect references of ``names`` (comma-separated): an attack name becomes its built development suspects."""
    from suspects.zoo import default_zoo, dev_suspects

    attacks = set(default_zoo().manifest["attacks"])
    out: list[str] = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if name in attacks:
            found = dev_suspects(name)
            if not found:
                raise Refused(f"no development suspect of {name} is built; build them with "
                              f"`backdoor-lens zoo build --role dev --attack {name}`")
            out += found
        else:
            out.append(name)
    return out


def check_suspect(ref: str):
    """The loaded suspect ``ref`` names, or :class:`Refused` saying why tuning may not use it."""
    import suspects
    from suspects.zoo import test_suspect_reason

    why = test_suspect_reason(ref)
    if why is None:
        sus = suspects.load(ref)
        why = test_suspect_reason(ref, sus)
    if why is not None:
        raise Refused(f"{why}: tuning never uses a test suspect; use development suspects (`backdoor-lens zoo "
                      "--role dev`, e.g. zoo:badnets-dev-s10 or just `badnets`)")
    data = (sus.card.get("data") or {}).get("name")
    if data == "demo":
        raise Refused(f"{ref} is measured on the demo bundle's data, whose test split is the benchmark's; tune on "
                      "development suspects (fashion-mnist-dev data)")
    return sus


def check_seeds(seeds: list[int]) -> None:
    low = [s for s in seeds if s < DEV_SEED_BASE]
    if low:
        raise Refused(f"defense seed(s) {low} are below {DEV_SEED_BASE}: the benchmark uses seeds 0-2, tuning uses "
                      f"{DEV_SEED_BASE} and up")


def development_split(n: int, seed: int = 123):
    """``n`` Fashion-MNIST training images outside the demo bundle (its train and test sources): the development
    split of the rounds before the zoo (``scripts/capacity_study.py`` still measures on it). It overlaps the
    ``fashion-mnist-dev`` source, so it is not used with development suspects."""
    import numpy as np
    import torch

    from suspects.data import DEMO_DATA, load_dataset

    full = load_dataset({"name": "fashion-mnist"})
    free = np.setdiff1d(np.arange(len(full.train)), np.load(DEMO_DATA)["train_source_index"])
    pick = np.random.default_rng(seed).choice(free, n, replace=False)
    return full.train.subset(torch.as_tensor(pick), "development")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("defense")
    ap.add_argument("suspect", help="attack names (their development suspects), zoo:NAME of development suspects, "
                    "or suspect folders; comma-separated")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="parameter override")
    ap.add_argument("--images", type=int, help="measure on N random images of each suspect's evaluation split "
                    "(default: all 2,500)")
    ap.add_argument("--pool-size", type=int, help="clean pool images (default: the suspect's pool, <= 1000)")
    ap.add_argument("--seed", type=int, default=DEV_SEED_BASE, help=f"the defense's seed (>= {DEV_SEED_BASE})")
    ap.add_argument("--seeds", type=int, default=0, help=f"run seeds {DEV_SEED_BASE}..{DEV_SEED_BASE}+N-1 instead "
                    "of --seed, and summarise")
    ap.add_argument("--log", type=Path, default=DEFAULT_LOG, help="append one JSON line per trial to this file "
                    "(default docs/dev-trials.jsonl)")
    ap.add_argument("--note", default="", help="a note kept with every trial of this call (why it was run)")
    args = ap.parse_args(argv)

    from backdoor_lens.cli import parse_sets
    from defenses import run_defense
    from suspects.identity import fingerprint

    seeds = [DEV_SEED_BASE + i for i in range(args.seeds)] if args.seeds else [args.seed]
    try:
        check_seeds(seeds)
        refs = expand(args.suspect)
        loaded = [(ref, check_suspect(ref)) for ref in refs]  # every suspect is checked before anything runs
    except (Refused, ValueError, OSError) as err:
        print(f"tune_on_dev: refused: {err}", file=sys.stderr)
        return 2
    overrides = parse_sets(args.set)
    measure = f"subset:{args.images}" if args.images else "full"
    for ref, sus in loaded:
        fp = fingerprint(sus)
        drops, asrs, secs = [], [], []
        for seed in seeds:
            t = time.time()
            report = run_defense(args.defense, sus, args.preset, overrides, pool_size=args.pool_size, suspect_ref=ref,
                                 seed=seed, measure=measure)
            seconds = time.time() - t
            drops.append(report["ba_before"] - report["ba"])
            asrs.append(report["asr"])
            secs.append(seconds)
            shown = {k: v for k, v in report["artifacts"].items()
                     if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
            asr_b = report["asr_before"]
            print(f"{args.defense} {ref} {args.preset} {json.dumps(overrides)} seed {seed}: development BA "
                  f"{report['ba_before']:.3f} -> {report['ba']:.3f} (drop {drops[-1]:+.3f}), ASR "
                  f"{asr_b if asr_b is None else f'{asr_b:.3f}'} -> "
                  f"{report['asr'] if report['asr'] is None else format(report['asr'], '.3f')}, {seconds:.0f} s",
                  flush=True)
            print("artifacts:", json.dumps(shown), flush=True)
            row = {"when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "note": args.note,
                   "defense": args.defense, "suspect": ref, "fingerprint": fp, "role": "dev",
                   "data": sus.card.get("data"), "preset": args.preset, "overrides": overrides,
                   "params": report["params"], "seed": seed, "pool_size": report["pool_size"],
                   "measured_on": report["measured_on"], "dev_ba_before": report["ba_before"],
                   "dev_asr_before": asr_b, "dev_ra_before": report["ra_before"], "dev_ba": report["ba"],
                   "dev_asr": report["asr"], "dev_ra": report["ra"], "seconds": round(seconds, 1),
                   "machine": report["machine"]}
            args.log.parent.mkdir(parents=True, exist_ok=True)
            with args.log.open("a") as fh:
                fh.write(json.dumps(row, default=str) + "\n")
        if len(seeds) > 1 and all(a is not None for a in asrs):
            print(f"SUMMARY {args.defense} {ref} {args.preset} {json.dumps(overrides)} seeds {len(seeds)}: BA drop "
                  f"{statistics.mean(drops):.3f} +- {statistics.stdev(drops):.3f}, ASR {statistics.mean(asrs):.3f} "
                  f"+- {statistics.stdev(asrs):.3f}, {statistics.mean(secs):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
