"""droppath's schedules and convert on the drop-path modules of the real libraries."""

from torch import nn

from conftest import require
from droppath import DropPath, convert, drop_path_sites, set_drop_rates


def test_real_timm():
    timm_layers = require("timm.layers")
    model = nn.Sequential(timm_layers.DropPath(0.1))
    convert(model)
    assert isinstance(model[0], DropPath) and model[0].p == 0.1


def test_real_torchvision():
    ops = require("torchvision.ops")
    model = nn.Sequential(ops.StochasticDepth(0.1, "row"))
    assert [n for n, _ in drop_path_sites(model)] == ["0"]
    convert(model)
    assert isinstance(model[0], DropPath) and model[0].p == 0.1


def test_real_transformers():
    hf = require("transformers.models.convnext.modeling_convnext")
    model = nn.Sequential(hf.ConvNextDropPath(0.1))
    assert [n for n, _ in drop_path_sites(model)] == ["0"]
    set_drop_rates(model, [0.3])
    assert model[0].drop_prob == 0.3
    convert(model)
    assert isinstance(model[0], DropPath) and model[0].p == 0.3
