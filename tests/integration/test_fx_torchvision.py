"""torch.fx tools of torchvision on models built from droppath's modules."""

import torch
from torch import nn

from conftest import require
from droppath import DropPath, Residual


def _model():
    return nn.Sequential(
        nn.Linear(8, 8),
        Residual(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)), p=0.5),
        DropPath(0.5),
        nn.Linear(8, 2),
    )


def test_create_feature_extractor_follows_train_and_eval():
    fe = require("torchvision.models.feature_extraction")
    model = _model()
    train_nodes, eval_nodes = fe.get_graph_node_names(model)
    assert "1" in train_nodes and "2" in eval_nodes  # droppath's modules are nodes of their own
    extractor = fe.create_feature_extractor(model, return_nodes={"1": "block", "3": "out"})
    x = torch.randn(64, 8)
    extractor.eval()
    feats = extractor(x)
    model.eval()
    h = model[0](x)
    expected_block = h + model[1].branch(h)
    torch.testing.assert_close(feats["block"], expected_block, rtol=0, atol=0)
    torch.testing.assert_close(feats["out"], model(x), rtol=0, atol=0)
    extractor.train()
    block = extractor(x)["block"].detach()
    with torch.no_grad():
        delta = block - h
        full = 2 * model[1].branch(h)
    dropped = (delta == 0).all(1)
    kept = torch.isclose(delta, full, atol=1e-5).all(1)
    assert (dropped | kept).all() and dropped.any() and kept.any()
