"""``backdoor-lens export-backdoorbench``: write a (repaired) suspect as BackdoorBench's ``defense_result.pt``."""

from __future__ import annotations

import argparse
import sys

ORDER = 130


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export-backdoorbench",
                              help="write a (repaired) suspect as BackdoorBench's defense_result.pt",
                              description="Write a suspect's model as BackdoorBench's defense_result.pt "
                                          "({model_name, num_classes, model}); preact_resnet18 and "
                                          "resnet18_torchvision only.")
    p.add_argument("suspect", help="suspect folder (a run-store run, an import) or demo:NAME")
    p.add_argument("--out", required=True, help="folder to write into (with --method: the attack run's folder)")
    p.add_argument("--method", help="write to OUT/defense/METHOD/defense_result.pt, BackdoorBench's layout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import suspects
    from suspects.backdoorbench import export_backdoorbench, export_notes

    suspect = suspects.load(args.suspect)
    path = export_backdoorbench(suspect, args.out, method=args.method)
    print(f"wrote {path} (model_name, num_classes, model)")
    for note in export_notes(suspect):
        print(f"  warning: {note}", file=sys.stderr)
    return 0
