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
