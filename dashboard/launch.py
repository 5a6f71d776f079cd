"""Start the Streamlit server and warm up the heavy imports as soon as it listens.

``backdoor-lens serve`` runs ``python -m dashboard.launch APP [streamlit flags]``. Once the server accepts
connections, a background thread imports torch and the library while the browser is still loading the page's
JavaScript, so the first script run finds them imported. (Importing earlier would compete with the server's own
start-up for the interpreter.)
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time


def _port(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg == "--server.port" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--server.port="):
            return int(arg.split("=", 1)[1])
    return 8501


def _warm_up(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    import pandas  # noqa: F401

    import dashboard.common  # noqa: F401  (torch, suspects, runs.store, streamlit)


def main() -> None:
    args = sys.argv[1:]
    if os.environ.get("BACKDOOR_LENS_NO_WARMUP") != "1":
        threading.Thread(target=_warm_up, args=(_port(args),), name="backdoor-lens-warm-up", daemon=True).start()
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", *args]
    cli.main()


if __name__ == "__main__":
    main()
