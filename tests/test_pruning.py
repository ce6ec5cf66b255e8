"""Tests of droppath.pruning: prune."""

import pytest
import torch
from torch import nn

from droppath import Residual, prune, set_drop_rates
from stand_ins import residual_stack, timm_style


class TestPrune:
    def test_removes_highest_rates_and_keeps_shortcut_path(self):
        torch.manual_seed(0)
        blocks = [Residual(nn.Linear(4, 4), shortcut=nn.Linear(4, 4, bias=False)) for _ in range(2)]
        blocks += [Residual(nn.Linear(4, 4)) for _ in range(2)]
        model = nn.Sequential(blocks[2], blocks[0], blocks[3], blocks[1]).eval()
        set_drop_rates(model, [0.1, 0.9, 0.2, 0.8])
        x = torch.randn(5, 4)
        # blocks 1 and 3 (rates 0.9 and 0.8) become their shortcuts alone
        with torch.no_grad():
            expected = blocks[1].shortcut(model[2](blocks[0].shortcut(model[0](x))))
            assert not torch.allclose(model(x), expected)  # the check below can fail
        report = prune(model, 2)
        assert report["blocks_removed"] == ["1", "3"]
        assert report["parameters_removed"] == 2 * 20  # the two branches; shortcuts stay
        assert report["parameters_left"] == 2 * 20 + 2 * 16
        assert model[1] is blocks[0].shortcut and model[3] is blocks[1].shortcut
        torch.testing.assert_close(model(x), expected)

    def test_bad_k(self):
        with pytest.raises(ValueError, match=r"k must be in \[0, 4\] for this model, got 5"):
            prune(residual_stack(), 5)
        assert prune(residual_stack(), 0)["blocks_removed"] == []

    def test_prune_says_what_can_be_pruned(self):
        model = timm_style()
        with pytest.raises(
            ValueError,
            match=r"k must be 0 for this Sequential, got 1: prune removes only droppath Residual "
            r"blocks and layer-drop layers \(layer_drop\), and it has neither \(it has drop-path "
            r"modules \(DropPath\) inside its blocks\)",
        ):
            prune(model, 1)
        with pytest.raises(ValueError, match=r"it has neither \(it has none\)"):
            prune(nn.Linear(2, 2), 1)
        with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
            prune("model", 1)
