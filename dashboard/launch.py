"""Start the Streamlit server with the heavy imports (torch, the library) warming up in parallel.

``backdoor-lens serve`` runs ``python -m dashboard.launch APP [streamlit flags]``: the server boots and the
browser loads the page while torch is imported in a background thread, so the first page renders sooner.
"""

from __future__ import annotations

import sys
import threading


def _warm_up() -> None:
    import pandas  # noqa: F401

    import dashboard.common  # noqa: F401  (torch, suspects, defenses.runstore, streamlit)


def main() -> None:
    import os

    if os.environ.get("BACKDOOR_LENS_NO_WARMUP") != "1":
        threading.Thread(target=_warm_up, name="backdoor-lens-warm-up", daemon=True).start()
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
