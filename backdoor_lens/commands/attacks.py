"""``backdoor-lens attacks``: the registered attacks and their defaults."""

from __future__ import annotations

import argparse

ORDER = 100


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("attacks", help="list attacks",
                              description="List the registered attacks and their defaults.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suspects.triggers import get_trigger_class, list_triggers

    for name in list_triggers(include_recovered=True):
        cls = get_trigger_class(name)
        label = "clean-label" if cls.clean_label else "dirty-label"
        print(f"{name:10s} {label:12s} {cls.description}  defaults: {cls.defaults}")
    return 0
