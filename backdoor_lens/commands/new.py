"""``backdoor-lens new defense|attack NAME``: write a minimal installable plugin package (docs/plugins.md)."""

from __future__ import annotations

import argparse

ORDER = 106


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "new", help="write a plugin package for a new defense or attack",
        description="Write a minimal installable package (pyproject.toml with the entry point, one module with a "
                    "working example, a test) for a new defense or attack. Install it with `pip install -e DIR`; "
                    "it then appears in `backdoor-lens defenses` / `attacks` and in the dashboard.")
    p.add_argument("kind", choices=["defense", "attack"], help="what the plugin adds")
    p.add_argument("name", help="its name: a lower-case Python identifier, e.g. my_defense")
    p.add_argument("--out", help="folder to write (default ./NAME); must not exist or be empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from backdoor_lens.scaffold import write_scaffold

    files = write_scaffold(args.kind, args.name, args.out)
    root = files[0].parent
    listing = "defenses" if args.kind == "defense" else "attacks"
    print(f"wrote {root}: " + ", ".join(str(f.relative_to(root)) for f in files))
    print(f"next: pip install -e {root}   (offline: pip install --no-build-isolation -e {root})")
    print(f"      python -m pytest {root / 'tests'}")
    print(f"      backdoor-lens {listing}   # lists {args.name}; see docs/plugins.md")
    return 0
