"""Runs the README's and the documentation site's ``python`` blocks that need timm, torchvision,
transformers or Lightning, each as written in a fresh namespace (see ``tests/docs_blocks.py``);
the other blocks run in the default suite (``tests/test_docs.py``)."""

import pytest

from conftest import require
from docs_blocks import blocks, run

REAL = [b for b in blocks("python") if b.needs()]


def test_there_are_real_library_examples():
    assert len(REAL) >= 6


@pytest.mark.parametrize("block", REAL, ids=[b.id for b in REAL])
def test_python_block_runs_as_written(block):
    for name in block.needs():
        require(name)
    if "transformers.Trainer" in block.code or "from transformers import Trainer" in block.code:
        require("accelerate")  # the Hugging Face Trainer's own dependency
    run(block)
