"""The code blocks of the README and of the documentation site, and how to run one as written.

A fenced block names its language: ``python`` (a script: runs as written, in a fresh namespace),
``pycon`` (``>>>`` lines: run as doctests by pytest's ``--doctest-glob=*.md``, one fresh namespace
per file), ``bash`` (commands) or ``text`` (output, diagrams), which are not run. A ``python``
block whose first line is ``# torchrun --nproc_per_node=N FILE.py`` runs under torchrun with N
processes. Blocks that import one of ``REAL`` run in the real-library step
(``tests/integration/test_readme_docs.py``), the others in the default suite
(``tests/test_docs.py``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import linecache
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ("python", "pycon", "bash", "text")
# The libraries a block may need beyond the test extra: their import decides where it runs.
REAL = ("timm", "torchvision", "transformers", "lightning", "pytorch_lightning")
_IMPORT = re.compile(
    r"^\s*(?:import|from)\s+(" + "|".join(REAL) + r"|droppath\.integrations\.(\w+))\b", re.M
)
_TORCHRUN = re.compile(r"^# torchrun --nproc_per_node=(\d+) (\S+\.py)\n")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    def needs(self) -> list[str]:
        """The libraries of ``REAL`` this block imports (an integration imports its trainer)."""
        return sorted({integration or name for name, integration in _IMPORT.findall(self.code)})


def pages() -> list[Path]:
    """The README, the changelog and every page of the site."""
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fences(path: Path) -> list[tuple[int, str, str]]:
    """``(line, info string, code)`` of every fenced block of ``path``."""
    found, opened, info, body = [], 0, "", []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if not opened:
                opened, info, body = number, line.strip()[3:].strip(), []
            else:
                found.append((opened, info, "\n".join(body) + "\n"))
                opened = 0
        elif opened:
            body.append(line)
    assert not opened, f"{path}:{opened}: a fence is never closed"
    return found


def blocks(lang: str | None = None) -> list[Block]:
    return [
        Block(str(path.relative_to(ROOT)), line, info, code)
        for path in pages()
        for line, info, code in fences(path)
        if lang is None or info == lang
    ]


@contextlib.contextmanager
def _isolated():
    """A fresh working directory and environment, restored afterwards."""
    cwd, env = os.getcwd(), dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)


@functools.cache
def run(block: Block) -> tuple[dict, str]:
    """Run a ``python`` block as written: its namespace afterwards, and what it printed.

    Cached, so that a test checking what a block claims reuses the run of the test that runs it.
    """
    torchrun = _TORCHRUN.match(block.code)
    with _isolated() as tmp:
        if torchrun:
            nprocs, name = torchrun.groups()
            (tmp / name).write_text(block.code)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])
            )
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={nprocs}", name]  # fmt: skip
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{block.id} failed under torchrun:\n{done.stderr[-4000:]}"
            return {}, done.stdout
        scope: dict = {"__name__": "__main__"}
        # The block's source, readable as a script's is (inspect.getsource: accelerate derives
        # a block class's training forward from it); the name is not a file, so register it.
        linecache.cache[block.id] = (len(block.code), None, block.code.splitlines(True), block.id)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.code, block.id, "exec"), scope)
        return scope, out.getvalue()


def find(path: str, needle: str) -> Block:
    """The one ``python`` block of ``path`` that contains ``needle``."""
    found = [b for b in blocks("python") if b.path == path and needle in b.code]
    assert len(found) == 1, f"{path}: {len(found)} python blocks contain {needle!r}"
    return found[0]
