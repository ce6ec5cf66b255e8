"""The ``droppath`` command: ``droppath bench`` and ``droppath train``.

Each command is a module of ``droppath.commands``. A user mistake (a bad option value, a missing
data folder) prints one line and exits with 2; tracebacks are left for bugs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from droppath.commands import COMMANDS, UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="droppath", description="Stochastic depth that really skips the dropped work."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"droppath.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        code: int = ns.handler(ns)
        return code
    except UsageError as e:
        print(f"droppath {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
