"""``backdoor-lens models``: the registered architectures."""

from __future__ import annotations

import argparse

ORDER = 90


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list architectures", description="List the registered architectures.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suspects.models import list_models

    print("\n".join(list_models()))
    return 0
