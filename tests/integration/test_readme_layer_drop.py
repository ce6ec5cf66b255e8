"""Runs the README's layer-drop example as written, in a fresh namespace (it needs transformers),
and checks what it claims."""

from conftest import require
from docs_blocks import find, run


def test_readme_layer_drop_block_runs():
    require("transformers")
    scope, _ = run(find("README.md", "layer_drop(model"))
    model, sched = scope["model"], scope["sched"]
    assert [round(p, 6) for p in sched.get_last_p()][-1] > 0
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"
