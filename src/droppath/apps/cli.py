"""The ``droppath`` command: ``droppath bench`` and ``droppath train``.

Each command is a module of ``droppath.apps.commands``. A user mistake (a bad option value, a
missing data folder) prints one line, naming the flags (``as_flags``), and exits with 2;
tracebacks are left for bugs. ``--help`` imports no torch: the commands load it when they run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from droppath.apps.commands import COMMANDS, UsageError, as_flags


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with every command's options, or only ``command``'s (the others listed by
    name and help): a command's module, and torch with it, loads only when that command runs."""
    parser = argparse.ArgumentParser(
        prog="droppath", description="Stochastic depth that really skips the dropped work."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"droppath.apps.commands.{name}").register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if not a.startswith("-")), "")  # droppath has no global option
    parser = build_parser(command)
    ns = parser.parse_args(args)
    try:
        code: int = ns.handler(ns)
        return code
    except UsageError as e:
        message = as_flags(str(e), getattr(ns, "flags", {}))
        print(f"droppath {ns.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
