"""Runs the README's layer-drop example (a Python block that needs transformers)."""

import re
from pathlib import Path

import torch

from conftest import require


def test_readme_layer_drop_block_runs():
    require("transformers")
    readme = Path(__file__).resolve().parents[2] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    block = next(b for b in blocks if "layer_drop(model" in b and ">>>" not in b)
    scope = {"torch": torch}
    exec(compile(block, "README.md", "exec"), scope)
    model, sched = scope["model"], scope["sched"]
    assert [round(p, 6) for p in sched.get_last_p()][-1] > 0
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"
