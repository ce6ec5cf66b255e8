"""What zero gradients for skipped parameters cost in one process (issue 27, item 9).

    .venv/bin/python benchmarks/skipped_grads_cost.py [--reps 40]

A dropped branch gives its parameters zero gradients, as the mask formulation does; before, in
one process, their ``.grad`` stayed ``None``. This times training steps of the README's batch-mode
row (the ResNet-110 trunk, 54 ``Residual`` blocks in batch mode, linear rates up to 0.5, batch 32
of 32x32 images) with the zero gradients (today's step) and without them (``_needs_touch``
patched to False, the old single-process step), interleaved step by step with the same draws, and
prints the medians and the paired ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import droppath._engine.ops as ops
from droppath.models.resnet import CifarResNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CifarResNet(110, p=0.5, rule="linear", mode="batch").train()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    touch = ops._needs_touch
    variants = {"zero grads": touch, "grads None": lambda: False}
    times: dict[str, list[float]] = {k: [] for k in variants}

    def step(name: str, seed: int) -> float:
        ops._needs_touch = variants[name]
        torch.manual_seed(seed)  # the same draws for both
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return time.perf_counter() - t

    try:
        for i in range(3):  # warm-up
            for name in variants:
                step(name, i)
        for i in range(args.reps):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            for name in order:
                times[name].append(step(name, 1000 + i))
    finally:
        ops._needs_touch = touch
    a, b = times["zero grads"], times["grads None"]
    ratios = [p / q for p, q in zip(a, b, strict=True)]
    print(f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    for name, t in times.items():
        print(f"{name:<12} median step {1e3 * statistics.median(t):.1f} ms")
    print(f"zero grads / grads None: median paired ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
