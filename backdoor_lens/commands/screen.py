"""``backdoor-lens screen``: input screening (STRIP, SCALE-UP, IBD-PSC) of a suspect's test split and of the
user's own images, with a threshold chosen on the clean defense pool (see ``analysis.screening``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]

ORDER = 55


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``screen`` subcommand."""
    from backdoor_lens import cli

    p = subparsers.add_parser(
        "screen", help="score inputs for triggers (STRIP, SCALE-UP, IBD-PSC) and flag the suspicious ones",
        description="Input screening: every image gets a score (higher = more likely triggered) and is flagged "
                    "above a threshold chosen on the clean defense pool for a target false-positive rate. With a "
                    "known or adopted trigger, the test split's clean and triggered images give the AUROC and the "
                    "TPR at that threshold; --images DIR gives a verdict for each of your own PNG/JPEG images.")
    cli.add_suspect_args(p)
    p.add_argument("--method", default=None,
                   help="strip, scale-up or ibd-psc (default: strip, the most accurate on the demo suspects)")
    p.add_argument("--preset", default="quick", choices=["quick", "paper"],
                   help="quick (CPU-friendly, default) or paper (the papers' settings, e.g. STRIP's N = 100)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="method parameter, repeatable (e.g. n=32)")
    p.add_argument("--fpr", type=float, default=0.05,
                   help="target false-positive rate on the clean pool that sets the threshold (default 0.05)")
    p.add_argument("--pool-size", type=int, help="use only the first N defense-pool images (default all)")
    p.add_argument("--limit", type=int, help="screen only the first N test images (default all)")
    p.add_argument("--images", metavar="DIR", help="also give a verdict for every PNG/JPEG image in DIR "
                                                    "(converted and resized to the model's input)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (method, auroc, tpr_at_fpr, fpr, threshold, seconds, ..., images)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"backdoor-lens screen: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Screen the suspect's test split (and ``--images``); exit 2 with a one-line message on bad input."""
    from analysis.screening import (
        DEFAULT_METHOD,
        get_screener,
        list_image_files,
        load_image,
        screen_images,
        screen_suspect,
    )
    from backdoor_lens import cli
    from suspects.data import DatasetNotFoundError
    from suspects.device import pick_device, prepare_model
    from suspects.store import SuspectLoadError

    method = args.method or DEFAULT_METHOD
    bar = None
    try:
        overrides = cli.parse_sets(args.set)
        get_screener(method, args.preset, overrides)  # an unknown method or parameter fails here, before any work
        suspect = cli.load_suspect(args)
        files = list_image_files(args.images) if args.images else []
        for f in files:  # refuse bad images before any screening work
            load_image(f, suspect.input_shape)
        device = pick_device(args.device)
        prepare_model(suspect.model, device)
        bar = cli.TqdmProgress(f"screen ({method})", disable=args.quiet or args.json)
        result = screen_suspect(suspect, method, preset=args.preset, params=overrides, fpr=args.fpr,
                                n_pool=args.pool_size, limit=args.limit, device=device, progress=bar)
        verdicts = screen_images(suspect, method, files, calibration=result.calibration) if files else []
    except (ValueError, SuspectLoadError, DatasetNotFoundError, RuntimeError) as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except KeyboardInterrupt:
        print("backdoor-lens screen: cancelled", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        out = result.to_dict(ndigits=4)
        if args.images:
            out["images"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.to_dict().items()}
                             for d in verdicts]
        cli.print_json(out)
        return 0
    print(f"{result.title} on {result.suspect} ({result.device}, {result.seconds:.1f} s): score = "
          f"{result.score_label}, higher = more likely triggered")
    print(f"threshold {result.threshold:.4f}, chosen on {result.n_pool} clean defense-pool images for a "
          f"{100 * result.fpr_target:g}% false-positive rate (pool FPR {result.fpr_pool:.3f})")
    print(f"  clean test images flagged (FPR)      {result.fpr:.3f}  (n={result.n_clean})")
    if result.auroc is None:
        print("  no trigger known: pass --attack (or adopt a recovered one) to measure AUROC and TPR")
    else:
        print(f"  triggered test images flagged (TPR)  {result.tpr_at_fpr:.3f}  (n={result.n_triggered})")
        print(f"  AUROC                                {result.auroc:.4f}")
    if verdicts:
        width = max(len(v.name) for v in verdicts)
        print(f"\n{'image':<{width}}  {'score':>10}  verdict           predicted")
        for v in verdicts:
            print(f"{v.name:<{width}}  {v.score:10.4f}  {v.verdict:<16}  {v.predicted} ({v.predicted_class})")
    return 0
