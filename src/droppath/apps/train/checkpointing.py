"""The files of a training: every write is atomic (a temporary file, then a rename), Ctrl-C
waits until the files written together are all written, and a previous run is not written over
unless asked."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from droppath.apps.data import DataError

__all__ = [
    "CHECKPOINT",
    "atomic_save",
    "atomic_write_bytes",
    "check_fresh",
    "check_writable",
    "clear_previous",
    "interrupt_deferred",
    "write_metrics",
]

CHECKPOINT = "checkpoint.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_metrics(folder: Path, history: list[dict[str, float]]) -> None:
    """A run's history, one row per epoch, as ``metrics.json`` and ``metrics.csv``."""
    atomic_write_bytes(folder / "metrics.json", json.dumps(history, indent=2).encode())
    text = io.StringIO()
    if history:
        writer = csv.DictWriter(text, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    atomic_write_bytes(folder / "metrics.csv", text.getvalue().encode())


@contextlib.contextmanager
def interrupt_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise it: files written together stay
    consistent. Only in the main thread, where signal handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def check_fresh(out: Path, plan: list[str]) -> None:
    """Refuse to write over a previous run in ``out`` unless told to (``overwrite``)."""
    old = [out / "results.json", *(out / name / CHECKPOINT for name in plan)]
    found = [str(p.relative_to(out)) for p in old if p.exists()]
    if found:
        raise DataError(
            f"out={str(out)!r} holds a previous run ({', '.join(found)}): continue it with "
            "resume=True, or replace it with overwrite=True"
        )


def clear_previous(out: Path) -> None:
    """Remove what a previous run wrote in ``out`` (only droppath's own files)."""
    names = ("results.md", "results.json", "plot.png")
    run_files = (CHECKPOINT, "metrics.json", "metrics.csv")
    for path in [out / n for n in names] + [
        out / r / n for r in ("with_sd", "without_sd") for n in run_files
    ]:
        path.unlink(missing_ok=True)


def check_writable(out: Path) -> None:
    """Make the folder ``out``, or say in one line why it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".droppath-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"out must be a writable folder, got {str(out)!r} ({e.strerror})") from None
