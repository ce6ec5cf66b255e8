import importlib
import os
from types import ModuleType

import pytest
import torch


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
