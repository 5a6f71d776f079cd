"""The ``backdoor-lens`` command line: ``serve``, ``train``, ``evaluate``, ``defend``, ``defenses`` and listings."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


def _parse_value(text: str) -> Any:
    """``3`` -> 3, ``0.2`` -> 0.2, ``true`` -> True, ``[1,2]`` -> [1, 2], else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``name=value`` items (values parsed as JSON when they can be) into a dict."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"error: expected name=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


class TqdmProgress:
    """Adapts the library's ``progress(fraction, message, metrics)`` callback to a tqdm bar."""

    def __init__(self, desc: str, disable: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc=desc, unit="‰", disable=disable, dynamic_ncols=True,
                        bar_format="{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        self.last = 0

    def __call__(self, fraction: float, message: str, metrics: dict) -> None:
        n = int(round(min(max(fraction, 0.0), 1.0) * 1000))
        self.bar.update(max(0, n - self.last))
        self.last = max(self.last, n)
        post = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in metrics.items() if k != "seconds"}
        self.bar.set_description(message)
        self.bar.set_postfix(post, refresh=True)
        if "ba" in metrics and not self.bar.disable:
            self.bar.write(f"{message}: " + ", ".join(f"{k}={v}" for k, v in post.items()))

    def close(self) -> None:
        self.bar.close()


# --- subcommands ------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.suspect:
        env["BACKDOOR_LENS_SUSPECT"] = args.suspect
    if args.runs:
        env["BACKDOOR_LENS_RUNS"] = str(Path(args.runs).resolve())
    if args.device:
        env["BACKDOOR_LENS_DEVICE"] = args.device
    cmd = [sys.executable, "-m", "dashboard.launch", str(APP),
           "--server.headless", "true", "--server.port", str(args.port), "--server.address", args.address,
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--server.maxUploadSize", str(args.max_upload_mb)]
    print(f"Backdoor Lens: http://{args.address}:{args.port}  (Ctrl-C stops)", flush=True)
    root = str(APP.parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if os.name == "posix":  # become the server: a signal to `serve` (Ctrl-C, kill, a test's terminate) reaches it
        os.execve(sys.executable, cmd, env)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def cmd_train(args: argparse.Namespace) -> int:
    from suspects.training import TrainConfig, train_suspect

    data: dict[str, Any] = {"name": args.data} if args.data in _sources() else {"name": "imagefolder", "root": args.data}
    if args.data_root:
        data["root"] = args.data_root
    if args.download:
        data["download"] = True
    attack = None if args.attack in ("none", "clean") else args.attack
    attack_params = parse_sets(args.attack_param)
    cfg = TrainConfig(data=data, model=args.model, width=args.width, attack=attack, attack_params=attack_params,
                      target=args.target, mapping=args.mapping, poison_rate=args.poison_rate, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                      augment=args.augment, pool_fraction=args.pool_fraction, seed=args.seed,
                      max_steps=args.max_steps, device=args.device, name=args.name)
    bar = TqdmProgress("training", disable=args.quiet)
    try:
        suspect = train_suspect(cfg, args.out, progress=bar, overwrite=args.overwrite)
    finally:
        bar.close()
    m = suspect.card["metrics"]
    print(json.dumps({"suspect": str(Path(args.out).resolve()), **{k: m[k] for k in ("ba", "asr", "ra")}}, indent=2))
    return 0


def _sources() -> list[str]:
    from suspects.data import list_sources

    return list_sources()


def cmd_evaluate(args: argparse.Namespace) -> int:
    import suspects
    from suspects.device import pick_device, prepare_model
    from suspects.metrics import DEFINITIONS

    suspect = _load_suspect(args)
    device = pick_device(args.device)
    model = prepare_model(suspect.model, device)
    m = suspects.evaluate(model, suspect.test, suspect.trigger, batch_size=args.batch_size, device=device,
                          limit=args.limit)
    result = {"suspect": suspect.name, **m.to_dict(), "device": str(device),
              "trigger": suspect.trigger.spec() if suspect.trigger else None}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"suspect  {suspect.name}  ({suspect.card.get('arch')}, {len(suspect.classes)} classes, device {device})")
    print(f"BA   {m.ba:.4f}   {DEFINITIONS['ba']} (n={m.n_clean})")
    if m.asr is None:
        print("ASR  n/a      no trigger known for this suspect")
    else:
        print(f"ASR  {m.asr:.4f}   {DEFINITIONS['asr']} (n={m.n_poisoned})")
        print(f"RA   {m.ra:.4f}   {DEFINITIONS['ra']}")
    return 0


def _load_suspect(args: argparse.Namespace):
    import suspects

    trigger = None
    if getattr(args, "attack", None):
        trigger = {"name": args.attack, "target": args.target, "mapping": args.mapping,
                   "params": parse_sets(args.attack_param)}
    suspect = suspects.load(args.suspect, arch=args.arch, num_classes=args.num_classes, data=args.data,
                            input_shape=tuple(args.input_shape) if args.input_shape else None,
                            arch_kwargs=parse_sets(args.arch_arg) or None, trigger=trigger)
    if trigger is not None and suspect.card.get("trigger") != trigger:
        from suspects.triggers import trigger_from_spec

        suspect._trigger_override = trigger_from_spec(trigger, suspect.input_shape, suspect.num_classes)
    return suspect


def cmd_defend(args: argparse.Namespace) -> int:
    import os

    from defenses.base import Cancelled
    from defenses.jobs import create_run, device_lock, execute
    from defenses.registry import get_defense
    from defenses.runstore import RunStore

    defense = get_defense(args.defense)
    store = RunStore(args.runs)
    with device_lock(store, args.device, wait=True):
        # nonsense is refused here, before a run is recorded or anything runs
        run_id = create_run(store, args.defense, args.suspect, args.preset, parse_sets(args.set), args.pool_size,
                            args.seed, args.device, pid=os.getpid())
        bar = TqdmProgress(f"{args.defense}", disable=args.quiet or args.json)
        try:
            status = execute(store, run_id, args.device, progress_hook=bar)
        except (KeyboardInterrupt, Cancelled):
            store.fail(run_id, "cancelled by the user", status="cancelled")
            status = "cancelled"
        finally:
            bar.close()
    rec = store.get(run_id)
    if status != "finished":
        print(f"backdoor-lens defend: run {run_id} {status}: {rec.error}", file=sys.stderr)
        return 1
    report = store.report(run_id)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "metric_definitions"}, indent=2, default=str))
        return 0
    print(f"{defense.title} on {args.suspect} ({report['device']}, {report['seconds']:.1f} s) -> {report['run_dir']}")
    for key, label in (("ba", "BA"), ("asr", "ASR"), ("ra", "RA")):
        before, after = report.get(f"{key}_before"), report.get(key)
        if after is not None:
            print(f"  {label:4s} {before:.4f} -> {after:.4f}")
    if report.get("der") is not None:
        print(f"  DER  {report['der']:.4f}   ((max(0, dASR) - max(0, dBA)) + 1) / 2")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from analysis.reverse import ScanConfig, save_recovered_suspect, scan_suspect, trigger_overlap
    from defenses.runstore import default_root
    from suspects.device import pick_device, prepare_model

    suspect = _load_suspect(args)
    config = ScanConfig(n_images=args.images, steps=args.steps, mini_batches=args.mini_batches,
                        batch_size=args.batch_size, lr=args.lr, init_cost=args.lam, threshold=args.threshold,
                        seed=args.seed)
    try:
        config.check()
    except ValueError as err:
        print(f"backdoor-lens detect: {err}", file=sys.stderr)
        return 2
    root = Path(args.runs).expanduser().resolve() if args.runs else default_root()
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
    if known is not None and known.name != "recovered" and known.mapping == "all-to-one":
        out["known_target"] = known.target
        out["known_target_flagged"] = known.target in result.flagged
        out["overlap_with_known_trigger"] = trigger_overlap(result.masks[known.target], known.footprint().numpy())
    if args.adopt is not None:
        target = result.most_suspicious if args.adopt == "auto" else int(args.adopt)
        if not 0 <= target < suspect.num_classes:
            print(f"backdoor-lens detect: --adopt must be a class in [0, {suspect.num_classes}) or auto",
                  file=sys.stderr)
            return 2
        out["adopted"] = {"class": target, "path": str(save_recovered_suspect(
            suspect, result, target, root, parent=args.suspect))}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"Neural Cleanse on {suspect.name}: {result.config.get('images')} defense-pool images, "
          f"{config.steps} epochs of {config.mini_batches}x{config.batch_size} images per class, {result.seconds:.1f} s")
    print("anomaly index = (median - l1) / (1.4826 * MAD) of the mask L1 norms of the converged classes; "
          f"a class is flagged when it exceeds {config.threshold:g}")
    print(f"{'class':>5}  {'name':<14} {'mask L1':>8} {'anomaly':>8} {'success':>8}")
    for k, name in enumerate(suspect.classes):
        mark = "  <- flagged" if k in result.flagged else ("  (did not converge)" if not result.converged[k] else "")
        print(f"{k:>5}  {name[:14]:<14} {result.l1[k]:8.2f} {result.anomaly[k]:8.2f} {result.success[k]:8.3f}{mark}")
    print(f"verdict: {verdict}")
    if "overlap_with_known_trigger" in out:
        ov = out["overlap_with_known_trigger"]
        print(f"known target {known.target}: {'flagged' if out['known_target_flagged'] else 'not flagged'}; "
              f"its mask puts {100 * ov['mass_on_trigger']:.0f}% of its mass on the known trigger "
              f"({100 * ov['footprint_share']:.1f}% of the pixels), IoU {ov['iou']:.2f}; on its mirror image "
              f"{100 * ov['mass_on_mirror']:.0f}%, IoU {ov['iou_mirror']:.2f} (closer: {ov['closer']})")
    if "adopted" in out:
        print(f"adopted the recovered trigger of class {out['adopted']['class']}: {out['adopted']['path']}")
    return 0


def cmd_defenses(args: argparse.Namespace) -> int:
    from defenses.base import param_specs
    from defenses.registry import all_defenses

    for d in all_defenses():
        print(f"{d.name:11s} {d.title} - {d.paper}")
        print(f"{'':11s} threat model: {d.threat.describe()}")
        print(f"{'':11s} presets: {', '.join(d.presets)}")
        if args.params:
            for spec in param_specs(d.Params):
                rng = ""
                if spec.get("choices"):
                    rng = f" one of {list(spec['choices'])}"
                elif spec.get("min") is not None or spec.get("max") is not None:
                    rng = f" in [{spec.get('min')}, {spec.get('max')}]"
                print(f"{'':13s}{spec['name']} = {spec['default']!r}{rng}: {spec['help']}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from defenses.compare import filter_runs, format_table, runs_table, table_csv, table_json
    from defenses.runstore import RunStore

    store = RunStore(args.runs)
    table = runs_table(store, args.suspect)
    if args.defense or args.preset:
        table = filter_runs(table, defenses=args.defense, presets=args.preset)
    if args.json:
        print(table_json(table, args.suspect))
    elif args.csv:
        print(table_csv(table), end="")
    elif table.empty:
        print(f"no finished run of {args.suspect} in {store.root} (`backdoor-lens defend DEFENSE {args.suspect}` "
              "adds one)", file=sys.stderr)
    else:
        print(f"{len(table)} finished run(s) of {args.suspect} in {store.root}, newest first\n")
        print(format_table(table))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from defenses.report import figures_png, run_figures, write_report
    from defenses.runstore import RunStore

    store = RunStore(args.runs)
    bar = TqdmProgress("report", disable=args.quiet)
    try:
        path = write_report(args.out, args.suspect, store=store, runs=args.run, n=args.sample, progress=bar)
    finally:
        bar.close()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained)")
    if args.png_dir:
        from defenses.compare import runs_table

        table = runs_table(store, args.suspect)
        if table.empty:
            print("no stored runs: no charts to write", file=sys.stderr)
            return 0
        out = Path(args.png_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in figures_png(run_figures(table)).items():
            (out / f"{name}.png").write_bytes(data)
            print(f"wrote {out / f'{name}.png'}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from suspects.models import list_models

    print("\n".join(list_models()))
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from suspects.triggers import _REGISTRY

    for name, cls in sorted(_REGISTRY.items()):
        label = "clean-label" if cls.clean_label else "dirty-label"
        print(f"{name:10s} {label:12s} {cls.description}  defaults: {cls.defaults}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from suspects.store import DEMO_SUSPECTS, list_demo_suspects

    for name in list_demo_suspects():
        card = json.loads((DEMO_SUSPECTS / name / "suspect.json").read_text())
        m = card.get("metrics", {})
        asr = "n/a" if m.get("asr") is None else f"{m['asr']:.3f}"
        print(f"demo:{name:10s} BA {m.get('ba', float('nan')):.3f}  ASR {asr}")
    return 0


def cmd_import_backdoorbench(args: argparse.Namespace) -> int:
    import re

    import suspects
    from defenses.runstore import default_root
    from suspects.backdoorbench import import_run
    from suspects.device import pick_device, prepare_model

    suspect = import_run(args.run_dir, data_root=args.data_root, name=args.name)
    root = Path(args.runs).expanduser().resolve() if args.runs else default_root()
    out = Path(args.out) if args.out else root / "imports" / re.sub(r"[^\w.+-]", "_", suspect.name)
    if not args.overwrite and out.exists():
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if not args.no_evaluate:
        device = pick_device(args.device)
        m = suspects.evaluate(prepare_model(suspect.model, device), suspect.test, suspect.trigger, device=device)
        suspect.card["metrics"] = {**m.to_dict(), "evaluated_on": "test split"}
    folder = suspects.save(suspect, out, overwrite=args.overwrite)
    bb = suspect.card["backdoorbench"]
    result = {"suspect": str(folder), "name": suspect.name, "arch": suspect.card["arch"],
              "arch_kwargs": suspect.card["arch_kwargs"], "target": bb["target"], "mapping": bb["mapping"],
              "n_bd_test": bb["n_bd_test"], "n_train_poisoned": bb["n_train_poisoned"],
              "n_train_noise": bb["n_train_noise"], "metrics": suspect.card.get("metrics"),
              "reported": bb["reported"] or None, "notes": bb["key_changes"] + bb["notes"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"imported {suspect.name} ({result['arch']} {result['arch_kwargs']}) -> {folder}")
    print(f"  attack: {bb['attack'] or 'unknown'}, {bb['mapping']}, target {bb['target']}; {bb['n_bd_test']} poisoned "
          f"test images, {bb['n_train_poisoned']} poisoned training samples ({bb['n_train_noise']} noise samples apart)")
    for key, label in (("ba", "BA"), ("asr", "ASR"), ("ra", "RA")):
        measured = (result["metrics"] or {}).get(key)
        reported = (bb["reported"] or {}).get(key)
        if measured is not None or reported is not None:
            text = "n/a" if measured is None else f"{measured:.4f}"
            print(f"  {label:4s} {text}" + ("" if reported is None else f"   (run's own CSV: {reported:.4f})"))
    for note in result["notes"]:
        print(f"  note: {note}")
    return 0


def cmd_export_backdoorbench(args: argparse.Namespace) -> int:
    import suspects
    from suspects.backdoorbench import export_backdoorbench, export_notes

    suspect = suspects.load(args.suspect)
    path = export_backdoorbench(suspect, args.out, method=args.method)
    print(f"wrote {path} (model_name, num_classes, model)")
    for note in export_notes(suspect):
        print(f"  warning: {note}", file=sys.stderr)
    return 0


# --- parser ----------------------------------------------------------------------------------------------


def _add_suspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suspect", help="suspect folder, demo:NAME, or a state dict (.safetensors/.pt/.pth)")
    g = p.add_argument_group("bare state dicts (a file, not a suspect folder)")
    g.add_argument("--arch", help="architecture name (see `backdoor-lens models`)")
    g.add_argument("--num-classes", type=int, help="number of classes of the checkpoint")
    g.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"), help="input shape (default 3 32 32)")
    g.add_argument("--arch-arg", action="append", metavar="NAME=VALUE", help="constructor argument, e.g. width=64")
    g.add_argument("--data", help="data source to measure on (demo, fashion-mnist, mnist, cifar10, gtsrb, or a folder)")
    t = p.add_argument_group("trigger (overrides the card's)")
    t.add_argument("--attack", help="attack name to evaluate with (see `backdoor-lens attacks`)")
    t.add_argument("--target", type=int, default=0, help="target class (default 0)")
    t.add_argument("--mapping", default="all-to-one", choices=["all-to-one", "all-to-all"])
    t.add_argument("--attack-param", action="append", metavar="NAME=VALUE", help="attack parameter, repeatable")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="backdoor-lens",
                                 description="Look inside a suspect image classifier and remove its backdoor.")
    ap.add_argument("--version", action="version", version="backdoor-lens 0.1.0")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="start the dashboard", description="Start the Streamlit dashboard (localhost by default).")
    p.add_argument("suspect", nargs="?", default=None, help="suspect to open first (default demo:badnets)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default localhost only)")
    p.add_argument("--runs", help="run store folder (default ./runs or $BACKDOOR_LENS_RUNS)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--max-upload-mb", type=int, default=200, help="upload size limit in MB")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train a (backdoored) suspect",
                       description="Train a model on a poisoned training set and write a suspect folder.")
    p.add_argument("--data", default="demo", help="demo, fashion-mnist, mnist, cifar10, gtsrb, or an ImageFolder path")
    p.add_argument("--data-root", help="folder holding the dataset files")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10/GTSRB (needs internet)")
    p.add_argument("--attack", default="badnets", help="attack name, or 'none' for a clean model")
    p.add_argument("--attack-param", action="append", metavar="NAME=VALUE", help="attack parameter, e.g. size=3")
    p.add_argument("--target", type=int, default=0, help="target class (default 0)")
    p.add_argument("--mapping", default="all-to-one", choices=["all-to-one", "all-to-all"])
    p.add_argument("--poison-rate", type=float, default=0.1, help="share of the training set poisoned (default 0.1)")
    p.add_argument("--model", default="preact_resnet18", help="architecture (see `backdoor-lens models`)")
    p.add_argument("--width", type=int, default=64, help="base channels (64 = the papers' size)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--augment", default="crop", choices=["none", "crop", "crop-flip"])
    p.add_argument("--pool-fraction", type=float, default=0.05, help="clean defense pool share of the training split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (quick tries)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--name", help="suspect name (default: the output folder's name)")
    p.add_argument("--out", required=True, help="suspect folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing suspect folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="print BA, ASR and RA of a suspect",
                       description="Measure BA, ASR and RA on the suspect's test split.")
    _add_suspect_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (ba, asr, ra, n_clean, n_poisoned)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--limit", type=int, help="only the first N test images")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("defend", help="run a defense on a suspect and store the repaired model",
                       description="Run a defense (see `backdoor-lens defenses`) on a suspect; the repaired model "
                                   "and its report go to the run store.")
    p.add_argument("defense", help="defense name")
    p.add_argument("suspect", help="suspect folder or demo:NAME")
    p.add_argument("--preset", default="quick", help="quick (CPU demo) or paper (official settings)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a parameter, repeatable")
    p.add_argument("--pool-size", type=int, default=500, help="clean defense-pool images to use (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", help="run store folder (default ./runs or $BACKDOOR_LENS_RUNS)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_defend)

    p = sub.add_parser("detect", help="reverse-engineer a trigger per class and flag the likely target",
                       description="Neural Cleanse (Wang et al., S&P 2019) on the suspect's clean defense pool: a "
                                   "minimal mask and pattern per class, anomaly index of the mask norms. Results are "
                                   "stored under the run store and reused.")
    _add_suspect_args(p)
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
    p.add_argument("--runs", help="run store folder (default ./runs or $BACKDOOR_LENS_RUNS)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--json", action="store_true", help="print JSON (l1, anomaly_index, flagged, seconds, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("defenses", help="list the defenses and their threat models",
                       description="List the registered defenses, their threat models and presets.")
    p.add_argument("--params", action="store_true", help="also list every parameter with its range")
    p.set_defaults(func=cmd_defenses)

    p = sub.add_parser("compare", help="table of every stored run of a suspect (BA, ASR, RA, DER, Pareto front)",
                       description="Print every finished defense run of SUSPECT in the run store: defense, preset, BA, "
                                   "ASR, RA, DER, seconds, device, clean data used, date; * marks the Pareto front "
                                   "(no other run has a BA at least as high and an ASR at least as low).")
    p.add_argument("suspect", help="the suspect the runs were made on (demo:NAME or a folder)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON: the rows with every column's definition")
    fmt.add_argument("--csv", action="store_true", help="CSV, one row per run")
    p.add_argument("--defense", action="append", metavar="NAME", help="only this defense (repeatable)")
    p.add_argument("--preset", action="append", metavar="NAME", help="only this preset (repeatable)")
    p.add_argument("--runs", help="run store folder (default ./runs or $BACKDOOR_LENS_RUNS)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="write one self-contained HTML report of a suspect and its runs",
                       description="Write an HTML report (opens offline: plotly.js inlined, images embedded) with "
                                   "the run table, BA vs. ASR with the Pareto front, bars per metric, and the suspect "
                                   "side by side with its best run (highest DER) or --run: Grad-CAM overlays, "
                                   "activation statistics, feature space, skip-ablation curves.")
    p.add_argument("suspect", help="the suspect the runs were made on (demo:NAME or a folder)")
    p.add_argument("--out", required=True, metavar="FILE.html", help="the report file to write")
    p.add_argument("--run", action="append", metavar="RUN_ID",
                   help="run to show next to the suspect (id or its last part, repeatable; default: the best by DER)")
    p.add_argument("--sample", type=int, default=200, help="test images per analysis (default 200)")
    p.add_argument("--png-dir", metavar="DIR", help="also write the run charts as PNG files into DIR")
    p.add_argument("--runs", help="run store folder (default ./runs or $BACKDOOR_LENS_RUNS)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("models", help="list architectures", description="List the registered architectures.")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("attacks", help="list attacks", description="List the registered attacks and their defaults.")
    p.set_defaults(func=cmd_attacks)
    p = sub.add_parser("demo", help="list the bundled demo suspects", description="List the demo suspects and their metrics.")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("import-backdoorbench", help="open a BackdoorBench run (or defense result) as a suspect",
                       description="Open a BackdoorBench attack run folder (record/<run>), one of its defense folders "
                                   "(record/<run>/defense/<method>) or their .pt file, and write it as a suspect "
                                   "folder under <runs>/imports/<name>/, where the dashboard lists it.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="BackdoorBench run folder, defense folder, or .pt file")
    p.add_argument("--data-root", help="folder with the run's clean dataset in torchvision's layout (default: "
                                       "BackdoorBench's ./data next to record/)")
    p.add_argument("--name", help="suspect name (default: the run's folder name, +<method> for a defense)")
    p.add_argument("--runs", help="run store folder (default ./runs or $BACKDOOR_LENS_RUNS)")
    p.add_argument("--out", help="write the suspect folder here instead of <runs>/imports/<name>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing suspect folder")
    p.add_argument("--no-evaluate", action="store_true", help="do not measure BA / ASR / RA on import")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_import_backdoorbench)

    p = sub.add_parser("export-backdoorbench", help="write a (repaired) suspect as BackdoorBench's defense_result.pt",
                       description="Write a suspect's model as BackdoorBench's defense_result.pt "
                                   "({model_name, num_classes, model}); preact_resnet18 and resnet18_torchvision only.")
    p.add_argument("suspect", help="suspect folder (a run-store run, an import) or demo:NAME")
    p.add_argument("--out", required=True, help="folder to write into (with --method: the attack run's folder)")
    p.add_argument("--method", help="write to OUT/defense/METHOD/defense_result.pt, BackdoorBench's layout")
    p.set_defaults(func=cmd_export_backdoorbench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from suspects.data import DatasetNotFoundError
    from suspects.store import SuspectLoadError

    try:
        return int(args.func(args) or 0)
    except (SuspectLoadError, DatasetNotFoundError, ValueError, FileExistsError, KeyError) as err:
        print(f"backdoor-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
