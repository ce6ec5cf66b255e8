"""Progress of the command-line tools on stderr: a tqdm bar on a terminal; elsewhere (a log
file, ``nohup``, a cluster job) one line per epoch, as the trainers print."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def progress_bar(total: int, label: str, enabled: bool = True) -> Any:
    """A ``tqdm`` bar of ``total`` steps, or None when ``enabled`` is False or stderr is not a
    terminal (CI logs stay clean). Callers pass ``enabled=False`` on ranks other than 0."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, leave=True, dynamic_ncols=True, file=sys.stderr)


def epoch_line(label: str, stats: Mapping[str, float], enabled: bool = True) -> None:
    """Print ``label: name value, ...`` on stderr when ``enabled`` and stderr is not a terminal
    (where ``progress_bar`` draws nothing), so a run that logs to a file still shows it is alive.

    Examples:
        >>> import contextlib
        >>> import io
        >>> log = io.StringIO()  # not a terminal, as a log file is not
        >>> with contextlib.redirect_stderr(log):
        ...     epoch_line("with_sd 1/10", {"train_loss": 0.51234, "epoch_time_s": 12.3})
        >>> print(log.getvalue(), end="")
        with_sd 1/10: train_loss 0.5123, epoch_time_s 12.3
    """
    if not enabled or sys.stderr.isatty():
        return
    shown = ", ".join(f"{name} {value:.4g}" for name, value in stats.items())
    print(f"{label}: {shown}", file=sys.stderr, flush=True)
