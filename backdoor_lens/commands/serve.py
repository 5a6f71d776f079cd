"""``backdoor-lens serve``: start the Streamlit dashboard (localhost by default)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from backdoor_lens.cli import RUNS_HELP

ORDER = 10
APP = Path(__file__).resolve().parent.parent.parent / "dashboard" / "app.py"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="start the dashboard",
                              description="Start the Streamlit dashboard (localhost by default).")
    p.add_argument("suspect", nargs="?", default=None, help="suspect to open first (default demo:badnets)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default localhost only)")
    p.add_argument("--runs", help=RUNS_HELP)
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--max-upload-mb", type=int, default=200, help="upload size limit in MB")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
           "--client.toolbarMode", "minimal",  # no "Deploy" button: this is a local tool
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
