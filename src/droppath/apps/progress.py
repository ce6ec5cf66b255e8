"""Progress bars of the command-line tools: tqdm on stderr, on a terminal only."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, label: str, enabled: bool = True) -> Any:
    """A ``tqdm`` bar of ``total`` steps, or None when ``enabled`` is False or stderr is not a
    terminal (CI logs stay clean). Callers pass ``enabled=False`` on ranks other than 0."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, leave=True, dynamic_ncols=True, file=sys.stderr)
