import importlib
import os
from types import ModuleType

import pytest
import torch

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


def run_two_processes(worker, args, timeout: float = 240) -> None:
    """Run ``worker(rank, 2, port, *args)`` in 2 spawned processes (a gloo group on a free local
    port); fail the test if a rank raises or the pair does not finish in ``timeout`` seconds."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(
        worker, args=(2, port, *args), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"the 2-process run did not finish in {timeout:.0f} s")
