"""Defense x attack table over the demo suspects (a benchmark, not a test).

    python scripts/bench_defenses.py [--preset quick] [--pool-size 500] [--defenses a,b] [--suspects x,y]
                                     [--markdown out.md]

Runs every registered defense on every backdoored demo suspect with the given preset and a 500-image clean
pool, and prints BA, ASR, RA (after), DER and seconds, plus the suspects' numbers before any defense.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--pool-size", type=int, default=500)
    ap.add_argument("--defenses", default="")
    ap.add_argument("--suspects", default="badnets,blended,sig,wanet")
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed (pool draw and the defense's randomness)")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0 = torch's default); 1 is much faster on a busy shared CPU")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import suspects
    from defenses import get_defense, list_defenses, run_defense
    from suspects.device import describe_device, pick_device

    names = [d for d in (args.defenses.split(",") if args.defenses else list_defenses()) if d]
    demo = [s for s in args.suspects.split(",") if s]
    rows = []
    header = f"{'defense':12s} {'suspect':9s} {'BA':>6s} {'ASR':>6s} {'RA':>6s} {'DER':>6s} {'sec':>6s}"
    print(f"preset {args.preset}, seed {args.seed}, pool {args.pool_size} images, device {describe_device(pick_device())}")
    print(header)
    loaded = {s: suspects.load(f"demo:{s}") for s in demo}
    for s, sus in loaded.items():
        m = sus.card["metrics"]
        rows.append(("(none)", s, m["ba"], m["asr"], m["ra"], None, 0.0))
        print(f"{'(none)':12s} {s:9s} {m['ba']:6.3f} {m['asr']:6.3f} {m['ra']:6.3f} {'':>6s} {'':>6s}", flush=True)
    for d in names:
        for s, sus in loaded.items():
            t = time.time()
            try:
                r = run_defense(d, sus, args.preset, pool_size=args.pool_size, suspect_ref=f"demo:{s}", seed=args.seed)
            except Exception as err:  # noqa: BLE001 - a benchmark reports and goes on
                print(f"{d:12s} {s:9s} failed: {err}", flush=True)
                continue
            rows.append((d, s, r["ba"], r["asr"], r["ra"], r["der"], r["seconds"]))
            extra = {k: r["artifacts"].get(k) for k in get_defense(d).artifact_labels if k in r["artifacts"]}
            print(f"{d:12s} {s:9s} {r['ba']:6.3f} {r['asr']:6.3f} {r['ra']:6.3f} {r['der']:6.3f} "
                  f"{time.time() - t:6.1f}" + "".join(f" {k}={v:.3f}" for k, v in extra.items()
                                                      if isinstance(v, float)), flush=True)
    if args.markdown:
        lines = ["| defense | suspect | BA | ASR | RA | DER | seconds |", "|---|---|---|---|---|---|---|"]
        for d, s, ba, asr, ra, der, sec in rows:
            lines.append(f"| {d} | {s} | {ba:.3f} | {asr:.3f} | {ra:.3f} | {'' if der is None else f'{der:.3f}'} | "
                         f"{'' if d == '(none)' else f'{sec:.0f}'} |")
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
