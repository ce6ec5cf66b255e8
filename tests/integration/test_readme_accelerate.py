"""Runs the README's and the tutorial's ``accelerate`` examples (Python blocks that need timm)."""

import contextlib
import io
import re
from pathlib import Path

from conftest import require

ROOT = Path(__file__).resolve().parents[2]


def _block(path: Path, needle: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    return next(b for b in blocks if needle in b and ">>>" not in b)


def _run(code: str, name: str) -> tuple[dict, str]:
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, name, "exec"), scope)
    return scope, out.getvalue()


def test_readme_accelerate_block_runs_and_prints_what_it_says():
    require("timm")
    code = _block(ROOT / "README.md", "accelerate(model")
    scope, printed = _run(code, "README.md")
    claimed = re.search(r"print\(report.counts\(\)\)\s+# (\{.*\})", code).group(1)
    assert printed.strip() == claimed
    assert type(scope["model"].blocks[0]).__name__ == "Block"
    assert scope["model"].blocks[0].attn.qkv.weight.grad is not None


def test_tutorial_accelerate_section_runs():
    require("timm")
    code = _block(ROOT / "docs" / "tutorial.md", "accelerate(model")
    scope, printed = _run(code, "docs/tutorial.md")
    assert "24 sites: 24 row subset, 0 batch skip, 0 mask" in printed
    assert "blocks.0.drop_path1" in printed
    assert scope["sched"].last_step == 1
