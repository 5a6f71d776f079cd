"""``backdoor-lens report``: one self-contained HTML report of a suspect and its runs (and PNG charts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backdoor_lens.cli import TqdmProgress, add_runs_flag

ORDER = 80


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="write one self-contained HTML report of a suspect and its runs",
                              description="Write an HTML report (opens offline: plotly.js inlined, images embedded) "
                                          "with the run table, BA vs. ASR with the Pareto front, bars per metric, and "
                                          "the suspect side by side with its best run (highest DER) or --run: "
                                          "Grad-CAM overlays, activation statistics, feature space, skip-ablation "
                                          "curves.")
    p.add_argument("suspect", help="the suspect the runs were made on (demo:NAME or a folder)")
    p.add_argument("--out", required=True, metavar="FILE.html", help="the report file to write")
    p.add_argument("--run", action="append", metavar="RUN_ID",
                   help="run to show next to the suspect (id or its last part, repeatable; default: the best by DER)")
    p.add_argument("--sample", type=int, default=200, help="test images per analysis (default 200)")
    p.add_argument("--png-dir", metavar="DIR", help="also write the run charts as PNG files into DIR")
    add_runs_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from runs.compare import runs_table
    from runs.identity import resolve_ref
    from runs.report import figures_png, run_figures, write_report
    from runs.store import RunStore
    from suspects.atomic import write_bytes

    store = RunStore(args.runs)
    bar = TqdmProgress("report", disable=args.quiet)
    try:
        path = write_report(args.out, args.suspect, store=store, runs=args.run, n=args.sample, progress=bar)
    finally:
        bar.close()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained)")
    if args.png_dir:
        table = runs_table(store, resolve_ref(args.suspect, store))
        if table.empty:
            print("no stored runs: no charts to write", file=sys.stderr)
            return 0
        out = Path(args.png_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in figures_png(run_figures(table)).items():
            write_bytes(out / f"{name}.png", data)
            print(f"wrote {out / f'{name}.png'}")
    return 0
