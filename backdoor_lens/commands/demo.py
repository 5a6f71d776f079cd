"""``backdoor-lens demo``: the bundled demo suspects and their metrics."""

from __future__ import annotations

import argparse
import json

ORDER = 110


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="list the bundled demo suspects",
                              description="List the demo suspects and their metrics.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suspects.store import DEMO_SUSPECTS, list_demo_suspects

    names = list_demo_suspects()
    width = max((len(f"demo:{n}") for n in names), default=0)
    for name in names:
        card = json.loads((DEMO_SUSPECTS / name / "suspect.json").read_text())
        m = card.get("metrics", {})
        asr = "n/a" if m.get("asr") is None else f"{m['asr']:.3f}"
        trig = card.get("trigger") or {}
        mapping = "  (all-to-all)" if trig.get("mapping") == "all-to-all" else ""
        print(f"{f'demo:{name}':{width}s}  BA {m.get('ba', float('nan')):.3f}  ASR {asr}{mapping}")
    return 0
