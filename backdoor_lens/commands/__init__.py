"""The subcommands of ``backdoor-lens``: one module each, with ``register(subparsers)`` and ``run(args) -> int``.

:func:`backdoor_lens.cli.build_parser` finds them with :mod:`pkgutil` (modules starting with ``_`` are skipped) and
lists them in ``--help`` by their ``ORDER`` constant. Heavy imports belong inside ``run`` so ``--help`` stays fast.
"""
