"""``backdoor-lens plugins``: the installed plugins every registry found, and those it refused with the reason."""

from __future__ import annotations

import argparse

ORDER = 105


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plugins", help="list installed plugins (defenses, attacks, architectures, screeners)",
        description="List the entry points (backdoor_lens.defenses, backdoor_lens.attacks, "
                    "backdoor_lens.architectures, backdoor_lens.screeners) of installed packages: what each added "
                    "to its registry, or why it was refused. See docs/plugins.md.")
    p.add_argument("--all", action="store_true", help="also list Backdoor Lens's own (built-in) entries")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def load_all_records(include_builtin: bool = False) -> list:
    """Every registry's records (loading each registry, and so its plugins, first)."""
    from analysis.screening import list_screeners
    from defenses.registry import list_defenses
    from suspects.models import list_models
    from suspects.plugins import plugin_records
    from suspects.triggers import list_triggers

    list_defenses(), list_triggers(), list_models(), list_screeners()
    return [r for r in plugin_records() if include_builtin or not r.builtin]


def run(args: argparse.Namespace) -> int:
    from backdoor_lens.cli import print_json

    records = load_all_records(args.all)
    if args.json:
        print_json([r.as_dict() for r in records])
        return 0
    if not records:
        print("no plugins installed (a package adds one with a backdoor_lens.defenses / .attacks / .architectures / "
              ".screeners entry point; `backdoor-lens new defense NAME` writes one)")
        return 0
    for r in records:
        what = ", ".join(r.provides) if r.status == "loaded" else f"REFUSED: {r.reason}"
        print(f"{r.kind:13s} {r.name:20s} {r.status:7s} {what}")
        print(f"{'':13s} {r.value} (from {r.dist})")
    return 0
