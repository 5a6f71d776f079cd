"""``backdoor-lens zoo``: list the suspect zoo; ``backdoor-lens zoo build``: train what is missing (docs/zoo.md)."""

from __future__ import annotations

import argparse
import json

from backdoor_lens.cli import TqdmProgress, parse_sets, print_json

ORDER = 115


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", help="zoo manifest (default assets/zoo.json or $BACKDOOR_LENS_ZOO_MANIFEST)")
    p.add_argument("--root", help="folder of the built suspects (default assets/zoo or $BACKDOOR_LENS_ZOO)")
    p.add_argument("--role", choices=["test", "dev"], help="only test or only development suspects")
    p.add_argument("--attack", help="only this attack's suspects (an attack of the manifest: clean, badnets, ...; "
                                    "`backdoor-lens zoo` lists them)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "zoo", help="list the suspect zoo (test and development suspects per attack); `zoo build` trains them",
        description="List the suspect zoo: per demo attack and the clean model, test suspects (the bundle's recipe, "
                    "training seeds 0-2; seed 0 is the bundle's) and development suspects (other seeds, on "
                    "Fashion-MNIST images the bundle does not use). Load one as zoo:NAME. See docs/zoo.md.")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--verify", action="store_true",
                   help="recompute the fingerprint of every built suspect's weights and compare with the manifest's")
    p.set_defaults(func=run, zoo_command=None)
    sub = p.add_subparsers(dest="zoo_command", metavar="build")
    b = sub.add_parser("build", help="train the zoo suspects that are missing (resumable; one after the other)",
                       description="Train every selected zoo suspect that is not built yet, one after the other, each "
                                   "into its folder atomically (a stopped build leaves nothing that looks complete; "
                                   "run the command again to go on). A new suspect's fingerprint is written into the "
                                   "manifest when it has none (commit the manifest then).")
    _common(b)
    b.add_argument("--only", action="append", metavar="NAME", help="only this suspect (repeatable), e.g. badnets-s1")
    b.add_argument("--dry-run", action="store_true", help="say what would be built, build nothing")
    b.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="override a training argument of the recipe (e.g. epochs=1; never recorded in the manifest)")
    b.add_argument("--no-record", action="store_true", help="do not write new fingerprints into the manifest")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)


def _zoo(args: argparse.Namespace):
    from suspects.zoo import Zoo

    return Zoo(args.manifest, args.root)


def run(args: argparse.Namespace) -> int:
    zoo = _zoo(args)
    rows = [zoo.describe(e, verify=args.verify) for e in zoo.entries(args.role, args.attack)]
    if args.json:
        print_json(rows)
        return 0
    print(f"zoo: {zoo.manifest_path} (built suspects in {zoo.root})")
    print(f"{'name':<20} {'role':<5} {'attack':<8} {'seed':>4}  {'data':<18} {'present':<8} fingerprint")
    for r in rows:
        fp = r["fingerprint"] or "-"
        if args.verify and r.get("matches") is False:
            fp += f" (weights: {r['weights_fingerprint']}: differ)"
        where = "bundle" if r["bundle"] and r["present"] else ("yes" if r["present"] else "no")
        print(f"{r['name']:<20} {r['role']:<5} {r['attack']:<8} {r['seed']:>4}  {r['data']:<18} {where:<8} {fp}")
    missing = sum(not r["present"] for r in rows)
    print(f"{len(rows)} suspects, {missing} not built" + (" (backdoor-lens zoo build)" if missing else ""))
    return 0


def run_build(args: argparse.Namespace) -> int:
    zoo = _zoo(args)
    overrides = parse_sets(args.set) or None
    bar = TqdmProgress("zoo", disable=args.quiet or args.dry_run)
    try:
        results = zoo.build(role=args.role, attack=args.attack, only=args.only, dry_run=args.dry_run,
                            overrides=overrides, record=not args.no_record, progress=bar)
    finally:
        bar.close()
    if args.json:
        print_json([vars(r) for r in results])
        return 0
    for r in results:
        line = f"{r.name}: {r.action}"
        if r.action == "built":
            line += f" in {r.seconds:.0f} s, fingerprint {r.fingerprint} ({r.check}), " + json.dumps(
                {k: round(v, 4) for k, v in r.metrics.items() if isinstance(v, float)})
        elif r.action == "would build":
            line += ": " + zoo.entry(r.name).command(zoo.path(zoo.entry(r.name)))
        print(line)
    todo = sum(r.action == "would build" for r in results)
    if todo and not overrides:
        from suspects.zoo import SECONDS_PER_SUSPECT

        low, high = (todo * s / 3600 for s in SECONDS_PER_SUSPECT)
        print(f"{todo} to build: about {low:.1f}-{high:.1f} h on 2 idle CPU cores (430-550 s a suspect, the bundle's "
              "times)")
    differs = [r.name for r in results if r.check == "differs"]
    if differs:
        print(f"note: {', '.join(differs)}: the weights built here differ from the manifest's fingerprint (another "
              "machine's numerics or torch version); the manifest keeps its own"
              + ("" if args.no_record else " and lists these under `rebuilds`: pages and the benchmark count runs on "
                 "either (commit the manifest)"))
    return 0
