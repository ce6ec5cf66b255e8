"""A dependency-free progress bar on stderr for the command-line tools."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``Progress(total, label)``; call ``update(n, **stats)`` and ``close()``.

    Redraws in place at most ten times a second on a terminal; elsewhere (CI logs) it writes a
    line at 25% steps so that a log stays short.
    """

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.start = self._last = time.perf_counter()
        self._quarter = 0
        self.stats = ""

    def update(self, n: int = 1, **stats: float | str) -> None:
        self.done += n
        if stats:
            self.stats = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()
            )
        now = time.perf_counter()
        if self.tty:
            if now - self._last >= 0.1 or self.done >= self.total:
                self._draw(now, end="\r")
        else:
            quarter = 4 * self.done // self.total
            if quarter > self._quarter:
                self._quarter = quarter
                self._draw(now, end="\n")
        self._last = now if self.tty else self._last

    def _draw(self, now: float, end: str) -> None:
        width = 24
        filled = width * min(self.done, self.total) // self.total
        rate = self.done / max(now - self.start, 1e-9)
        bar = "#" * filled + "." * (width - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {rate:.1f}/s {self.stats}"
        self.stream.write(line + end)
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._draw(time.perf_counter(), end="\n")
