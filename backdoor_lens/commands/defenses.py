"""``backdoor-lens defenses``: the registered defenses, their threat models, presets and (``--params``) parameters."""

from __future__ import annotations

import argparse

ORDER = 60


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("defenses", help="list the defenses and their threat models",
                              description="List the registered defenses, their threat models and presets.")
    p.add_argument("--params", action="store_true", help="also list every parameter with its range")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
