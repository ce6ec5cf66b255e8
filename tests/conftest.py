import datetime
import importlib
import os
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

# DeepSpeed (in the real extra) warns on stdout, when transformers imports it, that it found no
# accelerator; told the CPU, it says nothing (what examples print is compared)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Under pytest-xdist (pyproject's addopts), each worker gets its share of the cores for torch's
# threads, and so do the processes its tests start. More threads than free cores and torch's
# threads wait on each other: on this project's 2-core machine, with the other core busy, census
# families took 10 to 20 times longer at 2 threads than at 1.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _THREADS = max(1, (_CORES or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def binom_pvalue(k: int, n: int, p: float) -> float:
    """Two-sided exact binomial test p-value for k successes in n trials at rate p."""
    from scipy.stats import binomtest

    return float(binomtest(k, n, p).pvalue)


def require(name: str) -> ModuleType:
    """Import ``name`` for a test against a real library (timm, torchvision, transformers, ...).

    Skips where it is not installed, except with ``DROPPATH_REQUIRE_REAL=1`` (set by CI's step
    for these tests), where a missing library fails instead: in CI they never skip.
    """
    if os.environ.get("DROPPATH_REQUIRE_REAL") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


# The process-group timeout of the 2-process tests (``init_gloo``): a collective that the other
# rank never joins raises within this, rather than waiting for CI's time limit.
GLOO_TIMEOUT = datetime.timedelta(seconds=15)


def init_gloo(rank: int, world: int, port: int, *, store: Any = None) -> None:
    """Initialize the default process group of a rank of ``run_two_processes``: gloo on
    127.0.0.1:``port`` (or on ``store``), with ``GLOO_TIMEOUT``."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, store=store, timeout=GLOO_TIMEOUT)


class Progress:
    """What each rank of ``run_two_processes`` is doing, and until when, in one file per rank.

    A rank calls ``note(rank, what, limit)`` as it starts something that should take at most
    ``limit`` seconds; the parent's watchdog kills both ranks once a rank is past its deadline,
    and fails the test with what that rank was doing. Picklable: it is passed to the ranks.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = os.fspath(folder)
        os.makedirs(self.folder, exist_ok=True)

    def _path(self, rank: int) -> str:
        return os.path.join(self.folder, f"progress.rank{rank}")

    def note(self, rank: int, what: str, limit: float) -> None:
        tmp = self._path(rank) + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{time.time() + limit}\n{limit}\n{what}")
        os.replace(tmp, self._path(rank))  # the watchdog never reads half a note

    def last(self, rank: int) -> tuple[float, float, str] | None:
        """The last note of ``rank``: (deadline, limit, what), or None before the first."""
        try:
            with open(self._path(rank)) as f:
                deadline, limit, what = f.read().split("\n", 2)
        except FileNotFoundError:
            return None
        return float(deadline), float(limit), what

    def overdue(self, world: int) -> str | None:
        """What a rank past its deadline is doing, or None."""
        for rank in range(world):
            last = self.last(rank)
            if last is not None and time.time() > last[0]:
                return f"rank {rank} did not finish {last[2]} in {last[1]:.0f} s"
        return None


def run_two_processes(
    worker: Callable[..., None],
    args: tuple[Any, ...],
    timeout: float = 240,
    *,
    progress: Progress | None = None,
) -> None:
    """Run ``worker(rank, 2, port, *args)`` in 2 spawned processes (``port``: a free local port
    for their gloo group, see ``init_gloo``). Fail the test if a rank raises or dies; kill both
    ranks and fail it if they have not finished in ``timeout`` seconds, or, with ``progress``,
    if a rank has not made its first note in ``timeout`` seconds or is past the deadline of its
    last note (the message says what each rank was doing)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(
        worker, args=(2, port, *args), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if context.join(timeout=0.5):
                return
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:  # gloo aborts too
            pytest.fail(f"{error}{_notes(progress)}", pytrace=False)
        hung = progress.overdue(2) if progress is not None else None
        started = progress is not None and all(progress.last(r) for r in range(2))
        if hung is None and not started and time.monotonic() > deadline:
            what = "start" if progress is not None else "finish"
            hung = f"the 2-process run did not {what} in {timeout:.0f} s"
        if hung is not None:
            for proc in context.processes:
                proc.kill()
            for proc in context.processes:
                proc.join()
            pytest.fail(f"{hung} (both ranks killed){_notes(progress)}", pytrace=False)


def _notes(progress: Progress | None) -> str:
    if progress is None:
        return ""
    notes = [progress.last(rank) for rank in range(2)]
    return "; last notes: " + ", ".join(
        f"rank {r}: {n[2] if n else 'none'}" for r, n in enumerate(notes)
    )
