"""Runs the README's and the tutorial's ``accelerate`` examples as written, in a fresh namespace
(they need timm), and checks what they claim."""

import re

from conftest import require
from docs_blocks import find, run


def test_readme_accelerate_block_runs_and_prints_what_it_says():
    require("timm")
    block = find("README.md", "accelerate(model")
    scope, printed = run(block)
    claimed = re.search(r"print\(report.counts\(\)\)\s+# (\{.*\})", block.code).group(1)
    assert printed.strip() == claimed
    assert type(scope["model"].blocks[0]).__name__ == "Block"
    assert scope["model"].blocks[0].attn.qkv.weight.grad is not None


def test_tutorial_accelerate_section_runs():
    require("timm")
    scope, printed = run(find("docs/tutorial.md", "accelerate(model"))
    assert "24 sites: 24 row subset, 0 batch skip, 0 mask" in printed
    assert "blocks.0.drop_path1" in printed
    assert scope["sched"].last_step == 1


def test_how_to_blocks_print_what_they_say():
    require("timm")
    require("torchvision")
    require("transformers")
    for needle in ("timm.create_model", "torchvision.models"):
        block = find("docs/how-to/accelerate.md", needle)
        claimed = re.search(r"print\(report.counts\(\)\)\s+# (\{.*\})", block.code).group(1)
        assert run(block)[1].strip() == claimed, block.id
    text = run.__wrapped__ and find("docs/how-to/accelerate.md", "Dinov2Model")
    printed = run(text)[1].strip()
    page = (find.__globals__["ROOT"] / "docs" / "how-to" / "accelerate.md").read_text()
    assert f"```text\n{printed}\n```" in page
