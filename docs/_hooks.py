"""mkdocs hook: the command-line page shows the commands' own ``--help``, run at build time.

A page line ``<!-- droppath-help: train -->`` (``<!-- droppath-help: -->`` for the top level)
becomes a text block with what ``python -m droppath train --help`` prints for the checkout being
built (``src`` first on the path), so the page cannot fall behind the parser. The commands run in
parallel (``--help`` imports no torch: each answers in a fraction of a second).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- droppath-help:([a-z ]*)-->$", flags=re.M)
_cache: dict[str, str] = {}


def _helps(commands: list[str]) -> dict[str, str]:
    env = {
        **os.environ,
        "COLUMNS": "100",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    procs = {
        c: subprocess.Popen(
            [sys.executable, "-m", "droppath", *c.split(), "--help"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in commands
        if c not in _cache
    }
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"droppath {command} --help failed:\n{err}")
        _cache[command] = out
    return {c: _cache[c] for c in commands}


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs passes all four
    commands = [m.group(1).strip() for m in MARKER.finditer(markdown)]
    if not commands:
        return markdown
    helps = _helps(commands)

    def block(m: re.Match[str]) -> str:
        command = m.group(1).strip()
        shown = " ".join(["droppath", *command.split(), "--help"])
        return f"```text\n$ {shown}\n{helps[command]}```"

    return MARKER.sub(block, markdown)
