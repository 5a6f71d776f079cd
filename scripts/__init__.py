"""The repository's scripts (not installed with the package). Each puts the checkout root on ``sys.path``, so one
imports another as ``scripts.NAME``, whether it runs as ``python scripts/X.py`` or is loaded by a test."""
