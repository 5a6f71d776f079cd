"""``backdoor-lens import-backdoorbench``: open a BackdoorBench attack run (or one of its defense results) and write
it as a suspect folder under ``<runs>/imports/<name>/``, where the dashboard lists it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from backdoor_lens.cli import add_runs_flag, print_json, runs_root_of

ORDER = 120


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import-backdoorbench", help="open a BackdoorBench run (or defense result) as a suspect",
                              description="Open a BackdoorBench attack run folder (record/<run>), one of its defense "
                                          "folders (record/<run>/defense/<method>) or their .pt file, and write it as "
                                          "a suspect folder under <runs>/imports/<name>/, where the dashboard lists "
                                          "it.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="BackdoorBench run folder, defense folder, or .pt file")
    p.add_argument("--data-root", help="folder with the run's clean dataset in torchvision's layout, or an "
                                       "image-folder copy (train/<class>/<index>.png, test/<class>/<index>.png, "
                                       "named by torchvision's indices) (default: BackdoorBench's ./data next to "
                                       "record/)")
    p.add_argument("--name", help="suspect name (default: the run's folder name, +<method> for a defense)")
    add_runs_flag(p)
    p.add_argument("--out", help="write the suspect folder here instead of <runs>/imports/<name>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing suspect folder")
    p.add_argument("--no-evaluate", action="store_true", help="do not measure BA / ASR / RA on import")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import suspects
    from analysis.applicability import trigger_function_gaps
    from defenses.registry import all_defenses
    from suspects.backdoorbench import import_run
    from suspects.device import pick_device, prepare_model
    from suspects.metrics import stamp_metrics

    suspect = import_run(args.run_dir, data_root=args.data_root, name=args.name)
    out = Path(args.out) if args.out else runs_root_of(args) / "imports" / re.sub(r"[^\w.+-]", "_", suspect.name)
    if not args.overwrite and out.exists():
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if not args.no_evaluate:
        device = pick_device(args.device)
        m = suspects.evaluate(prepare_model(suspect.model, device), suspect.test, suspect.trigger, device=device)
        suspect.card["metrics"] = stamp_metrics(m, suspect.model, suspect.test, suspect.trigger)
    folder = suspects.save(suspect, out, overwrite=args.overwrite)
    bb = suspect.card["backdoorbench"]
    # what stamps the trigger on other images than the run's own, which a sample-specific stored trigger cannot
    gaps = trigger_function_gaps(suspect.trigger, [(d.name, d.trigger_needs()) for d in all_defenses()])
    result = {"suspect": str(folder), "name": suspect.name, "arch": suspect.card["arch"],
              "arch_kwargs": suspect.card["arch_kwargs"], "attack": bb["attack"], "lens_attack": bb.get("lens_attack"),
              "target": bb["target"], "mapping": bb["mapping"],
              "n_bd_test": bb["n_bd_test"], "n_train_poisoned": bb["n_train_poisoned"],
              "n_train_noise": bb["n_train_noise"], "metrics": suspect.card.get("metrics"),
              "reported": bb["reported"] or None, "lacks": bb.get("lacks", []), "needs_trigger_function": gaps,
              "notes": bb["key_changes"] + bb["notes"], "data": suspect.card["data"]}
    if args.json:
        print_json(result)
        return 0
    print(f"imported {suspect.name} ({result['arch']} {result['arch_kwargs']}) -> {folder}")
    known = result["lens_attack"]
    named = (f"{bb['attack']} (Backdoor Lens: {known})" if known and known != bb["attack"] else
             bb["attack"] if known else f"{bb['attack']} (no counterpart in Backdoor Lens)" if bb["attack"] else "unknown")
    print(f"  attack: {named}, {bb['mapping']}, target {bb['target']}; {bb['n_bd_test']} poisoned "
          f"test images, {bb['n_train_poisoned']} poisoned training samples ({bb['n_train_noise']} noise samples apart)")
    for key, label in (("ba", "BA"), ("asr", "ASR"), ("ra", "RA")):
        measured = (result["metrics"] or {}).get(key)
        reported = (bb["reported"] or {}).get(key)
        if measured is not None or reported is not None:
            text = "n/a" if measured is None else f"{measured:.4f}"
            print(f"  {label:4s} {text}" + ("" if reported is None else f"   (run's own CSV: {reported:.4f})"))
    print("  lacks: nothing (model, poisoned test and training images, settings and reported metrics are all "
          "there)" if not result["lacks"] else "  lacks:")
    for part in result["lacks"]:
        print(f"    - {part}")
    if gaps:
        print("  needs a trigger function (the trigger is the run's stored poisoned images, which cannot be stamped on "
              "other images):")
        for what, why in gaps.items():
            print(f"    - {what}: {why}")
    for note in result["notes"]:
        print(f"  note: {note}")
    return 0
