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
        description="The retuning attack of Min et al. (NeurIPS 2024): fine-tune the model for a few epochs on its "
                    "clean defense pool with a few samples carrying the trigger, and the clean model of the same "
                    "family the same way. 'robust' when the model's ASR after re-tuning stays within --set "
                    "tolerance=... (default 0.05) of the clean reference's, 'superficial' otherwise. The poisoned "
                    "samples come from the defense pool only; the test split is only measured. A finished run's "
                    "result is stored with the run (Compare column 'ASR after re-tuning').")
    p.add_argument("target", metavar="SUSPECT_OR_RUN",
                   help="demo:NAME, a suspect folder, or a run (id from `backdoor-lens compare`, or its folder)")
    p.add_argument("--reference", help="the clean reference model (default: demo:clean for the demo family, the "
                                       "parent's family for a run; 'none' for no reference)")
    p.add_argument("--trigger-from", metavar="SUSPECT",
                   help="borrow the trigger of the poisoned samples from this suspect when the target has none "
                        "(default for demo suspects: demo:badnets)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="parameter, repeatable: n_poison (5), epochs (5), lr (0.01), batch_size (128), pool_size "
                        "(500), augment (none), tolerance (0.05), momentum, weight_decay")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--no-save", action="store_true", help="do not store the result with the run")
    cli.add_runs_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print JSON (asr, ba, asr_after_retune, ba_after_retune, reference_asr_after_retune, "
                        "verdict, seconds, ...)")
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
    from runs.jobs import device_lock
    from runs.store import RunStore
    from runs.stress import run_stress
    from suspects.data import DatasetNotFoundError
    from suspects.store import SuspectLoadError

    bar = None
    try:
        params = cli.parse_sets(args.set)
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
    print(f"Stress test (retuning attack, {result['params']['n_poison']} poisoned of "
          f"{result['retune_set']['images']} pool images, {result['params']['epochs']} epochs) of "
          f"{result['suspect']} on {result['device']}, {result['seconds']:.1f} s")
    print(f"{'':<28}{'ASR':>8}{'BA':>8}{'ASR after':>11}{'BA after':>10}")
    print(f"{'model under test':<28}{_pct(result['asr']):>8}{_pct(result['ba']):>8}"
          f"{_pct(result['asr_after_retune']):>11}{_pct(result['ba_after_retune']):>10}")
    if result["reference"] is None:
        print("clean reference: none known (pass --reference SUSPECT)")
    else:
        label = f"reference ({result['reference']})"[:27]
        print(f"{label:<28}{_pct(result['reference_asr']):>8}{_pct(result['reference_ba']):>8}"
              f"{_pct(result['reference_asr_after_retune']):>11}{_pct(result['reference_ba_after_retune']):>10}")
    print(f"verdict: {result['verdict']} (robust = ASR after re-tuning at most "
          f"{100 * result['params']['tolerance']:g} points above the clean reference's)")
    if result.get("run_id") and not args.no_save:
        print(f"stored with run {result['run_id']}")
    return 0
