"""The ``backdoor-lens`` command line.

Each subcommand is one module of :mod:`backdoor_lens.commands` exposing ``register(subparsers)`` (adds its parser
and ``set_defaults(func=run)``) and ``run(args) -> int``; they are found with :mod:`pkgutil`, so a new command is
one new file. An optional module constant ``ORDER`` places it in ``--help`` (lower first). This module keeps
:func:`main` and what the commands share: ``--runs``, the suspect arguments, the progress bar and JSON printing.

Exit codes: 0 success, 1 a run that failed or was cancelled, 2 bad input (a message on one line of stderr;
``--verbose`` adds the details underneath).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "parse_sets", "TqdmProgress", "add_runs_flag", "runs_root_of", "add_suspect_args",
           "add_checkpoint_args", "suspect_reference", "load_suspect", "print_json", "list_commands"]

RUNS_HELP = "run store folder (default ./lens-runs or $BACKDOOR_LENS_RUNS)"


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


def rounded(obj: Any, digits: int = 4) -> Any:
    """``obj`` with every float rounded to ``digits`` decimals (nested dicts, lists and tuples too)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    """The JSON a command prints with ``--json``: indented, floats rounded to 4 decimals, values JSON cannot hold
    as their ``str``."""
    print(json.dumps(rounded(obj), indent=2, default=str))


# --- arguments shared by several commands ----------------------------------------------------------------------


def add_runs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", help=RUNS_HELP)


def runs_root_of(args: argparse.Namespace) -> Path:
    """The run-store folder a command uses: ``--runs``, else :func:`runs.store.runs_root`'s default."""
    from runs.store import runs_root

    return runs_root(getattr(args, "runs", None))


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The flags that describe a bare checkpoint (every subcommand that takes a suspect has them)."""
    g = p.add_argument_group("bare checkpoints (a file, not a suspect folder)")
    g.add_argument("--arch", help="architecture: a registered one (see `backdoor-lens models`), torchvision:NAME or "
                                  "timm:NAME (any model of those libraries; no weights are downloaded)")
    g.add_argument("--num-classes", type=int, help="number of classes (default: read off the classifier's weights)")
    g.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input shape (default: the data source's, else 3 32 32)")
    g.add_argument("--arch-arg", action="append", metavar="NAME=VALUE",
                   help="constructor argument, e.g. width=64, resize_to=224, depth=12")
    g.add_argument("--data", help="data source to measure on (demo, fashion-mnist, mnist, cifar10, gtsrb, or a folder)")
    g.add_argument("--normalize", metavar="NAME|M1,..,Mc/S1,..,Sc",
                   help="the model's input normalisation: a name (imagenet, cifar10, mnist, fashion-mnist, demo, half, "
                        "none) or per-channel means/stds, e.g. 0.2867/0.3534 (default for a file: the data source's "
                        "standard one, stated as assumed; a suspect folder keeps its card's)")


def add_suspect_args(p: argparse.ArgumentParser, trigger: bool = True,
                     help: str = "suspect folder, demo:NAME, a run id, or a checkpoint (.safetensors/.pt/.pth/.pt2) "
                                 "with --arch") -> None:
    p.add_argument("suspect", help=help)
    add_checkpoint_args(p)
    if not trigger:
        return
    t = p.add_argument_group("trigger (overrides the card's)")
    t.add_argument("--attack", help="attack name to evaluate with (see `backdoor-lens attacks`)")
    t.add_argument("--target", type=int, default=0, help="target class (default 0)")
    t.add_argument("--mapping", default="all-to-one", choices=["all-to-one", "all-to-all"])
    t.add_argument("--attack-param", action="append", metavar="NAME=VALUE", help="attack parameter, repeatable")


def load_suspect(args: argparse.Namespace):
    """The suspect named by :func:`add_suspect_args`' arguments, with ``--attack`` overriding its trigger."""
    import suspects

    trigger = None
    if getattr(args, "attack", None):
        trigger = {"name": args.attack, "target": args.target, "mapping": args.mapping,
                   "params": parse_sets(args.attack_param)}
    from runs.identity import resolve_ref

    args.suspect = resolve_ref(args.suspect, root=getattr(args, "runs", None))  # a run id names its repaired model
    suspect = suspects.load(args.suspect, arch=args.arch, num_classes=args.num_classes, data=args.data,
                            input_shape=tuple(args.input_shape) if args.input_shape else None,
                            arch_kwargs=parse_sets(args.arch_arg) or None, trigger=trigger,
                            normalize=getattr(args, "normalize", None))
    if trigger is not None and suspect.card.get("trigger") != trigger:
        from suspects.triggers import trigger_from_spec

        suspect._trigger_override = trigger_from_spec(trigger, suspect.input_shape, suspect.num_classes)
    return suspect


def suspect_reference(args: argparse.Namespace, attr: str = "suspect") -> str:
    """A reference that a background job, the run store and Compare can load again: the argument itself for
    ``demo:NAME``, a folder or a run; a bare checkpoint (with its flags) is loaded once and kept as a suspect folder
    under the run store's ``uploads/`` (:func:`runs.uploads.save_checkpoint`: the same file, the same folder)."""
    text = str(getattr(args, attr))
    path = Path(text).expanduser()
    if text.startswith("demo:") or not path.is_file():
        return text
    from runs.uploads import save_checkpoint

    suspect = load_suspect(argparse.Namespace(**{**vars(args), "suspect": text}))
    return str(save_checkpoint(path, suspect, runs_root_of(args)))


# --- the parser and main ---------------------------------------------------------------------------------------


def list_commands() -> list[Any]:
    """The command modules of :mod:`backdoor_lens.commands` (not those starting with ``_``), in ``ORDER``."""
    from . import commands

    mods = [importlib.import_module(f"{commands.__name__}.{m.name}")
            for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 1000), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="backdoor-lens",
                                 description="Look inside a suspect image classifier and remove its backdoor.")
    ap.add_argument("--version", action="version", version="backdoor-lens 0.1.0")
    ap.add_argument("--verbose", action="store_true", help="on an error, also print its details")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in list_commands():
        mod.register(sub)
    for p in {id(p): p for p in sub.choices.values()}.values():
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, also print its details")
    return ap


def _error_text(err: BaseException) -> tuple[str, str]:
    """(one-line summary, details) of an error shown to the user."""
    summary = getattr(err, "summary", None)
    details = str(getattr(err, "details", "") or "")
    if summary is None:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        lines = text.strip().splitlines() or [type(err).__name__]
        summary, rest = lines[0], "\n".join(lines[1:]).strip()
        details = details or rest
    return summary, details


def _apply_threads(args: argparse.Namespace) -> None:
    """torch's CPU threads for this command (:func:`suspects.device.cpu_threads`, role ``cli``): every core, or one
    while a background worker of the run store holds the others (issue 12.4)."""
    from runs.jobs import any_worker_running
    from suspects.device import apply_cpu_threads

    try:
        busy = any_worker_running(runs_root_of(args))
    except OSError:
        busy = False
    apply_cpu_threads("cli", worker_running=busy)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _apply_threads(args)
    from suspects.data import DatasetNotFoundError
    from suspects.store import SuspectLoadError

    try:
        return int(args.func(args) or 0)
    except (SuspectLoadError, DatasetNotFoundError, ValueError, FileExistsError, KeyError) as err:
        summary, details = _error_text(err)
        verbose = bool(getattr(args, "verbose", False))
        hint = " (--verbose shows details)" if details and not verbose else ""
        print(f"backdoor-lens {args.command}: error: {summary}{hint}", file=sys.stderr)
        if verbose and details:
            print(details, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
