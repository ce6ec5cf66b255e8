"""Tests of droppath.rates: the depth rules."""

import pytest
import torch
from torch import nn

from droppath import Residual, depth_rates, set_drop_rates


class TestDepthRates:
    def test_linear_is_the_papers_rule(self):
        assert depth_rates(4, 0.5, "linear") == [0.125, 0.25, 0.375, 0.5]
        assert depth_rates(1, 0.5, "linear") == [0.5]

    def test_linspace_matches_torch_linspace(self):
        assert depth_rates(5, 0.4, "linspace") == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
        assert depth_rates(12, 0.1, "linspace") == pytest.approx(
            torch.linspace(0, 0.1, 12, dtype=torch.float64).tolist()
        )
        assert depth_rates(1, 0.3, "linspace") == [0.0]

    def test_uniform_and_empty(self):
        assert depth_rates(3, 0.2, "uniform") == [0.2, 0.2, 0.2]
        assert depth_rates(0, 0.2) == []

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="n must be an int >= 0, got -1"):
            depth_rates(-1, 0.1)
        with pytest.raises(TypeError, match="n must be an int, got 2.5"):
            depth_rates(2.5, 0.1)
        with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2"):
            depth_rates(3, 2)
        with pytest.raises(ValueError, match="rule must be one of 'model', 'linear', 'linspace'"):
            depth_rates(3, 0.1, "cosine")

    def test_meta_device_model(self):
        with torch.device("meta"):
            model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(3)])
        assert [r for _, r in set_drop_rates(model, 0.3, "linear")] == pytest.approx(
            [0.1, 0.2, 0.3]
        )

    def test_bad_profile(self):
        with pytest.raises(ValueError, match="profile must be a sequence of one rate per block"):
            depth_rates(3, 0.1, profile=[0.1])
        with pytest.raises(ValueError, match=r"profile\[1\] must be a probability"):
            depth_rates(2, 0.1, profile=[0.1, 1.5])
