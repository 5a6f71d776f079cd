"""``backdoor-lens stress``: the retuning attack (Min et al., NeurIPS 2024) on a suspect or a repaired model, with
the clean model of its family as the reference (see ``defenses.stress`` and ``runs.stress``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]

ORDER = 45


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``stress`` subcommand."""
    from backdoor_lens import cli

    p = subparsers.add_parser(
        "stress", help="stress-test a model: does its backdoor come back after re-tuning on 5 poisoned samples?",
        description="The retuning attack of Min et al. (NeurIPS 2024) on the official protocol (ft_poison.py): "
                    "fine-tune the model for 5 epochs (SGD lr 0.01, no weight decay) on 1,000 images, 995 clean "
                    "defense-pool images (augmented) and 5 from the attack's own poisoned training set, over 3 seeds, "
                    "and the clean model of the same family the same way. Verdict: 'not repaired' (ASR before "
                    "re-tuning >= not_repaired_asr), 'superficial' (it comes back), 'robust' (within tolerance of "
                    "the clean reference's), 'inconclusive' (BA collapsed or too few images). The test split is only "
                    "measured. A finished run's result is stored with the run (Compare column 'ASR after "
                    "re-tuning'). See docs/stress.md.")
    p.add_argument("target", metavar="SUSPECT_OR_RUN",
                   help="demo:NAME, a suspect folder, or a run (id from `backdoor-lens compare`, or its folder)")
    cli.add_checkpoint_args(p)
    p.add_argument("--reference", help="the clean reference model (default: demo:clean for the demo family, the "
                                       "parent's family for a run; 'none' for no reference)")
    p.add_argument("--trigger-from", metavar="SUSPECT",
                   help="borrow the trigger of the poisoned samples from this suspect when the target has none "
                        "(default for demo suspects: demo:badnets)")
    p.add_argument("--preset", default="official", choices=("official", "lens-v1"),
                   help="official: ft_poison.py's protocol (default); lens-v1: the former settings (500 pool images, "
                        "5 of them triggered, weight decay 5e-4, no augmentation, one seed)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="parameter, repeatable: n_poison (5), pool_size (1000), poison_source (auto), epochs (5), "
                        "lr (0.01), momentum (0.9), weight_decay (0), batch_size (128), augment (auto), "
                        "augment_per_epoch (false), seeds (3), test_limit (0), and the verdict's tolerance (0.1), "
                        "not_repaired_asr (0.2), max_ba_drop (0.1), min_asr_images (100)")
    p.add_argument("--seed", type=int, default=0, help="first random seed (default 0; 'seeds' seeds from it)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--no-save", action="store_true", help="do not store the result with the run")
    cli.add_runs_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print JSON (asr, ba, asr_after_retune, ba_after_retune, reference_asr_after_retune, "
                        "verdict, verdict_reason, spread, seconds, params, protocol, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"backdoor-lens stress: error: {message}", file=sys.stderr)
    return 2


def _pct(v: float | None) -> str:
    return "  n/a" if v is None else f"{100 * v:5.1f}%"


def run(args: argparse.Namespace) -> int:
    """Stress-test the target; exit 2 with a one-line message on bad input."""
    from backdoor_lens import cli
    from defenses.base import ParamError
    from defenses.stress import stress_params
    from runs.jobs import device_lock
    from runs.store import RunStore
    from runs.stress import run_stress
    from suspects.data import DatasetNotFoundError
    from suspects.store import SuspectLoadError

    bar = None
    try:
        params = stress_params(args.preset, cli.parse_sets(args.set))
        args.target = cli.suspect_reference(args, "target")  # a checkpoint file is kept as a suspect folder
        store = RunStore(cli.runs_root_of(args))
        bar = cli.TqdmProgress("stress", disable=args.quiet or args.json)
        with device_lock(store, args.device, wait=True):  # one job at a time per device, as `defend` and the worker
            result = run_stress(args.target, store, params, reference=args.reference, trigger_from=args.trigger_from,
                                device=args.device, seed=args.seed, progress=bar, save=not args.no_save)
    except (ValueError, ParamError, SuspectLoadError, DatasetNotFoundError, FileNotFoundError) as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except KeyboardInterrupt:
        print("backdoor-lens stress: cancelled", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        cli.print_json(result)
        return 0
    rs = result["retune_set"]
    print(f"Stress test (retuning attack, {result['protocol']} protocol: {rs['poisoned']} poisoned from "
          f"{rs['from']} in {rs['images']} images, {result['params']['epochs']} epochs, seeds "
          f"{', '.join(str(s) for s in result['seeds'])}) of {result['suspect']} on {result['device']}, "
          f"{result['seconds']:.1f} s")
    print(f"{'':<28}{'ASR':>8}{'BA':>8}{'ASR after [min, max]':>26}{'BA after':>10}")

    def after(key: str) -> str:
        sp = (result.get("spread") or {}).get(key)
        if not sp:
            return _pct(result.get(key))
        return f"{_pct(sp['mean'])} [{_pct(sp['min']).strip()}, {_pct(sp['max']).strip()}]"

    print(f"{'model under test':<28}{_pct(result['asr']):>8}{_pct(result['ba']):>8}"
          f"{after('asr_after_retune'):>26}{_pct(result['ba_after_retune']):>10}")
    if result["reference"] is None:
        print("clean reference: none known (pass --reference SUSPECT)")
    else:
        label = f"reference ({result['reference']})"[:27]
        print(f"{label:<28}{_pct(result['reference_asr']):>8}{_pct(result['reference_ba']):>8}"
              f"{after('reference_asr_after_retune'):>26}{_pct(result['reference_ba_after_retune']):>10}")
    print(f"verdict: {result['verdict']}: {result['verdict_reason']}")
    if result.get("run_id") and not args.no_save:
        print(f"stored with run {result['run_id']}")
    return 0
