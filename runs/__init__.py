"""What happens around runs: the run store (SQLite index and run folders), the job queue and its worker, stored
detection scans, uploads, the comparison tables and figures, and the HTML report.

Layering: ``dashboard / cli -> runs -> defenses -> analysis -> suspects``; nothing below imports this package.

>>> from runs import RunStore, runs_root
>>> store = RunStore()            # at runs_root(): --runs, $BACKDOOR_LENS_RUNS, or ./lens-runs
>>> from runs.jobs import submit  # queue a defense for the background worker
"""

from .store import RunRecord, RunStore, runs_root  # noqa: F401

__all__ = ["RunRecord", "RunStore", "runs_root"]
