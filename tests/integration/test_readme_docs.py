"""Runs the README's and the documentation site's ``python`` blocks that need timm, torchvision,
transformers or Lightning, each as written in a fresh namespace (see ``tests/docs_blocks.py``);
the other blocks run in the default suite (``tests/test_docs.py``)."""

import pytest

from conftest import require
from docs_blocks import blocks, find, run

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


def test_accelerate_how_to_shows_the_code_accelerate_generates():
    """The how-to's generated code for a user block is what ``Derived.source`` prints."""
    block = find("docs/how-to/accelerate.md", "_droppath_derived.source")
    for name in block.needs():
        require(name)
    _, printed = run(block)
    shown = [b.code for b in blocks("text") if b.path == block.path and "__droppath" in b.code]
    assert shown and printed.endswith(shown[0]), printed


def _claimed(block):
    """What the block's ``print(...)  # value`` lines say they print, in order."""
    return [
        line.split("  # ", 1)[1].strip()
        for line in block.code.splitlines()
        if line.strip().startswith("print(") and "  # " in line
    ]


def test_schedules_how_to_scheduler_built_before_accelerate():
    """The scheduler drives the modules ``accelerate`` put in after it was built (issue 19)."""
    require("timm")
    block = find("docs/how-to/schedules.md", "drop_path_sites(model)")
    assert run(block)[1].splitlines() == _claimed(block)


def test_accelerate_how_to_traced_model():
    require("timm")
    block = find("docs/how-to/accelerate.md", "symbolic_trace")
    assert run(block)[1].splitlines() == _claimed(block)


def test_layer_drop_how_to_prune_then_save_pretrained():
    require("transformers")
    block = find("docs/how-to/layer-drop.md", "save_pretrained")
    printed = run(block)[1].splitlines()
    assert printed[0] == _claimed(block)[0]
    assert printed[1:] == ["2", "True"]


def test_layer_drop_how_to_generate_in_train_mode():
    require("transformers")
    block = find("docs/how-to/layer-drop.md", "model.generate")
    scope, printed = run(block)
    assert scope["model"].training
    assert printed.strip() == "torch.Size([2, 12])"


def test_accelerate_how_to_check_before_training():
    require("timm")
    _, out = run(find("docs/how-to/accelerate.md", "check(model"))
    assert out.strip() == "{'blocks.0': 'verified', 'blocks.1': 'verified'}"
