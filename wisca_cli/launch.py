"""The ``wisca`` command's entry point: start reading the checkpoint, then load the CLI.

Kept free of typer, rich and torch: the read-ahead (``prefetch``) starts here, 0.3 s
before the CLI's imports are done and 2 s before torch's.
"""

from __future__ import annotations

import sys


def main() -> None:
    from .prefetch import warm_start_from_argv

    warm_start_from_argv(sys.argv)
    from .cli import main as cli_main

    cli_main()
