"""Runs the README's layer-drop example as written, in a fresh namespace (it needs transformers),
and checks what it claims: the layers run on their kept samples (the model trains without a
key/value cache, which would make every layer run whole), and the scheduler keeps the exp curve."""

import warnings

import torch

from conftest import require
from docs_blocks import find, run
from droppath import depth_rates


def test_readme_layer_drop_block_runs():
    require("transformers")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*key/value cache.*")
        scope, _ = run(find("README.md", "layer_drop(model"))
    model, sched = scope["model"], scope["sched"]
    assert [round(p, 6) for p in sched.get_last_p()][-1] > 0
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert sched.base_rates == depth_rates(4, 0.5, "exp")  # the default rule kept the curve


def test_readme_layer_drop_block_drops_layers():
    require("transformers")
    scope, _ = run(find("README.md", "layer_drop(model"))
    model, ids = scope["model"], scope["ids"]
    rows = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*key/value cache.*")
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
    assert min(rows) < ids.shape[0], rows  # some layer ran on its kept samples only
