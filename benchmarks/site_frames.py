"""How much host code stands between a model's call and a branch's, in an accelerated timm ViT.

Two counts, on ``vit_tiny_patch16_224`` (timm, random weights, 32-pixel images, patch 8) after
``accelerate(model, 0.5, rule="uniform", strategy="subset")`` and its first (checking) step:

- **frames**: the Python frames of droppath's own files (``src/droppath/...``) on the stack when
  a branch module of block 3 (its MLP) is called, from the model's call down; the generated code
  of the derived forward (``<droppath derived ...>``) and torch's frames are listed, not counted;
- **calls per site**: the calls of droppath's functions in one training step (forward and
  backward), from ``sys.setprofile``, divided by the number of drop-path sites.

    python benchmarks/site_frames.py

Needs timm (the real-library environment). Prints the stack and both counts.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

import droppath

PACKAGE = str(Path(droppath.__file__).resolve().parent)


def _own(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(PACKAGE)


def main() -> int:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, drop_path_rate=0.1, img_size=32, patch_size=8
    )
    droppath.accelerate(model, 0.5, rule="uniform", strategy="subset")
    sites = len(droppath.drop_path_sites(model))
    model.train()
    x = torch.randn(8, 3, 32, 32)
    model(x).sum().backward()  # the check
    stacks: list[traceback.StackSummary] = []
    handle = model.blocks[3].mlp.register_forward_pre_hook(
        lambda *_: stacks.append(traceback.extract_stack())
    )
    for _ in range(50):  # until a step keeps block 3's MLP for some rows
        model(x).sum().backward()
        if stacks:
            break
    handle.remove()
    stack = stacks[0]
    start = max(i for i, f in enumerate(stack) if f.name == "main" and f.filename == __file__)
    chain = stack[start + 2 : -1]  # from the model's call to the branch's (hook frame left out)
    for f in chain:
        mark = "*" if _own(f.filename) else " "
        print(f"{mark} {Path(f.filename).name}:{f.lineno} {f.name}")
    frames = sum(_own(f.filename) for f in chain)

    calls = [0]

    def profile(frame: object, event: str, arg: object) -> None:
        if event == "call" and _own(frame.f_code.co_filename):  # type: ignore[attr-defined]
            calls[0] += 1

    torch.manual_seed(1)
    sys.setprofile(profile)
    try:
        model(x).sum().backward()
    finally:
        sys.setprofile(None)
    print(f"droppath frames between the model's call and a branch's: {frames}")
    print(f"droppath calls per site in one training step: {calls[0] / sites:.1f} ({sites} sites)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
