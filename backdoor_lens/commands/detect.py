"""``backdoor-lens detect``: Neural Cleanse (Wang et al., IEEE S&P 2019) on the suspect's clean defense pool, stored
under the run store and reused; ``--adopt`` saves a suspect that uses a recovered trigger."""

from __future__ import annotations

import argparse
import sys

from backdoor_lens.cli import (
    TqdmProgress,
    add_runs_flag,
    add_suspect_args,
    load_suspect,
    print_json,
    runs_root_of,
)

ORDER = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("detect", help="reverse-engineer a trigger per class and flag the likely target",
                              description="Neural Cleanse (Wang et al., S&P 2019) on the suspect's clean defense "
                                          "pool: a minimal mask and pattern per class, anomaly index of the mask "
                                          "norms. Results are stored under the run store and reused.")
    add_suspect_args(p)
    p.add_argument("--images", type=int, default=300, help="defense-pool images to use (default 300)")
    p.add_argument("--steps", type=int, default=80, help="epochs per class, at most (default 80)")
    p.add_argument("--mini-batches", type=int, default=4, help="Adam updates per epoch (default 4)")
    p.add_argument("--batch-size", type=int, default=8, help="images per update (default 8)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (default 0.1)")
    p.add_argument("--lam", type=float, default=1e-3, help="init_cost: the mask-L1 weight set once the attack "
                                                            "succeeds; the schedule then adapts it (default 0.001)")
    p.add_argument("--threshold", type=float, default=2.0, help="anomaly index that flags a class (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adopt", metavar="CLASS|auto",
                   help="save a copy of the suspect that uses the recovered trigger of this class (auto: the most "
                        "suspicious) under RUNS/recovered/, so every view and defense can use it")
    p.add_argument("--recompute", action="store_true", help="ignore a stored result")
    add_runs_flag(p)
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--json", action="store_true", help="print JSON (l1, anomaly_index, flagged, seconds, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from analysis.reverse import (
        ScanConfig,
        known_footprint_share,
        known_trigger_overlap,
        scan_images,
        scope_note,
    )
    from runs.scans import save_recovered_suspect, scan_suspect
    from suspects.device import pick_device, prepare_model
    from suspects.stored_trigger import attack_name

    suspect = load_suspect(args)
    config = ScanConfig(n_images=args.images, steps=args.steps, mini_batches=args.mini_batches,
                        batch_size=args.batch_size, lr=args.lr, init_cost=args.lam, threshold=args.threshold,
                        seed=args.seed)
    try:
        config.check()
    except ValueError as err:
        print(f"backdoor-lens detect: {err}", file=sys.stderr)
        return 2
    root = runs_root_of(args)
    suspect.model = prepare_model(suspect.model, pick_device(args.device))
    bar = TqdmProgress("neural cleanse", disable=args.quiet or args.json)
    try:
        result = scan_suspect(suspect, config, cache_root=root, progress=bar, recompute=args.recompute)
    except KeyboardInterrupt:
        print("backdoor-lens detect: cancelled", file=sys.stderr)
        return 1
    finally:
        bar.close()
    verdict = result.verdict(suspect.classes)
    out = {"suspect": suspect.name, "classes": suspect.classes, **result.to_dict(),
           "most_suspicious": result.most_suspicious, "verdict": verdict.level, "verdict_sentence": str(verdict)}
    known = suspect.trigger
    own_x = scan_images(suspect, config) if known is not None and known.sample_specific else None  # per-image trigger
    known_share = known_footprint_share(known, own_x) if known is not None and known.name != "recovered" else None
    out["known_attack"] = attack_name(known)
    out["scope_note"] = scope_note(verdict.level, known_share,
                                   (out["known_attack"] or known.name) if known_share is not None else None,
                                   attack=out["known_attack"],
                                   mapping=known.mapping if known is not None else "all-to-one")
    if known is not None and known.name != "recovered" and known.mapping == "all-to-one":
        out["known_target"] = known.target
        out["known_target_flagged"] = known.target in result.flagged
        out["overlap_with_known_trigger"] = known_trigger_overlap(result.masks[known.target], known, own_x)
    if args.adopt is not None:
        target = result.most_suspicious if args.adopt == "auto" else int(args.adopt)
        if not 0 <= target < suspect.num_classes:
            print(f"backdoor-lens detect: --adopt must be a class in [0, {suspect.num_classes}) or auto",
                  file=sys.stderr)
            return 2
        out["adopted"] = {"class": target, "path": str(save_recovered_suspect(
            suspect, result, target, root, parent=args.suspect))}
    if args.json:
        print_json(out)
        return 0
    print(f"Neural Cleanse on {suspect.name}: {result.config.get('images')} defense-pool images, "
          f"{config.steps} epochs of {config.mini_batches}x{config.batch_size} images per class, "
          f"{result.stored_text()}" + (" (--recompute runs it again)" if result.stored else ""))
    print("anomaly index = (median - l1) / (1.4826 * MAD) of the mask L1 norms of the converged classes; "
          f"a class is flagged when it exceeds {config.threshold:g}")
    print(f"converged = the epoch success (the kept mask's epoch, stamped images classified as the class) reached "
          f"{config.success_threshold:g}; re-measured = that mask once more on all the scan images (can be lower)")
    print(f"{'class':>5}  {'name':<14} {'mask L1':>8} {'anomaly':>8} {'epoch succ.':>11} {'re-measured':>11}")
    for row in result.class_table(suspect.classes):
        k = row["class"]
        mark = "  <- flagged" if row["flagged"] else ("  (did not converge)" if not row["converged"] else "")
        epoch = "-" if row["epoch_success"] is None else f"{row['epoch_success']:.3f}"
        print(f"{k:>5}  {row['name'][:14]:<14} {result.l1[k]:8.2f} {result.anomaly[k]:8.2f} {epoch:>11} "
              f"{result.success[k]:11.3f}{mark}")
    print(f"verdict: {verdict}")
    if out["scope_note"]:
        print(f"note: {out['scope_note']}")
    if "overlap_with_known_trigger" in out:
        ov = out["overlap_with_known_trigger"]
        print(f"known target {known.target}: {'flagged' if out['known_target_flagged'] else 'not flagged'}; "
              f"its mask puts {100 * ov['mass_on_trigger']:.0f}% of its mass on the known trigger "
              + (f"(each of {ov['per_image']} scan images' own, averaged) " if "per_image" in ov else "") +
              f"({100 * ov['footprint_share']:.1f}% of the pixels), IoU {ov['iou']:.2f}; on its mirror image "
              f"{100 * ov['mass_on_mirror']:.0f}%, IoU {ov['iou_mirror']:.2f} (closer: {ov['closer']})")
    if "adopted" in out:
        print(f"adopted the recovered trigger of class {out['adopted']['class']}: {out['adopted']['path']}")
    return 0
