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
