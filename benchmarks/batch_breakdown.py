"""Where the time of the README's batch-mode row goes (issue 28, item 6).

The row: the ResNet-110 trunk (54 ``Residual`` blocks in batch mode, width 16, linear rates up to
0.5, batch 32 of 32x32 images), a training step (forward, loss, backward), as
``droppath bench --kind conv --batch 32 --depth 54 -p 0.5 --rule linear --mode batch`` times it.
Five ways to run the same step, interleaved step by step (their order alternating) with the same
gate draws (one seed per step), on the same parameters:

- ``plain``: every block computed, no stochastic depth (the bench's baseline);
- ``Residual``: droppath as shipped;
- ``Residual, grads None``: the same, a skipped block's parameters left without gradients (the
  zero-gradient touch off: ``droppath._engine.ops._needs_touch`` patched to False);
- ``kept blocks only``: the plain blocks, the dropped ones not called, the kept ones scaled: the
  work the draws keep, with no droppath code at all (the floor);
- ``Residual p=0``: droppath with every rate 0 (its cost when nothing drops).

Prints each one's median step and median paired ratio to ``plain``, then the breakdown of the
``Residual`` ratio: the floor, the zero-gradient touch, and the rest (droppath's host-side step:
the draws, the calls). ``uptime`` beside it, please.

    python benchmarks/batch_breakdown.py [--reps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import droppath._engine.ops as ops
from droppath.apps.bench.config import BenchConfig
from droppath.apps.bench.models import build_model
from droppath.apps.bench.variants import Variant, variant_model
from droppath.residual import Residual


class _KeptOnly(nn.Module):
    """A plain block that, in a step, runs only when the gate ``keep[i]`` kept it."""

    def __init__(self, block: Residual, scale: float, keep: list[bool], i: int) -> None:
        super().__init__()
        self.branch, self.shortcut, self.scale, self.keep, self.i = (
            block.branch,
            block.shortcut,
            scale,
            keep,
            i,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = x if self.shortcut is None else self.shortcut(x)
        if not self.keep[self.i]:
            return base
        out: torch.Tensor = base + self.branch(x) * self.scale
        return out


def _kept_only(model: nn.Module) -> tuple[nn.Module, Callable[[], None]]:
    """A copy of ``model`` whose blocks run only where this step's gates keep them (drawn as
    droppath draws them: one ``torch.rand(())`` per block with a rate in (0, 1), in order)."""
    plain = variant_model(model, Variant("shared", "residual"))
    keep: list[bool] = []
    rates: list[float] = []
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Residual):
                rates.append(child.p)
                keep.append(True)
                setattr(parent, name, _KeptOnly(child, child.spec.scale, keep, len(rates) - 1))

    def draw() -> None:
        for i, p in enumerate(rates):
            keep[i] = p == 0.0 or (p < 1.0 and bool(torch.rand(()) < 1.0 - p))

    return plain, draw


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = BenchConfig(kind="conv", depth=54, batch=32, width=16, p=0.5, rule="linear", mode="batch")
    model, x = build_model(cfg)
    y = torch.randint(0, 10, (x.shape[0],))
    kept_only, draw = _kept_only(model)
    models = {
        "plain": variant_model(model, Variant("plain", "plain")),
        "Residual": variant_model(model, Variant("Residual", "residual")),
        "Residual, grads None": variant_model(model, Variant("Residual", "residual")),
        "kept blocks only": kept_only,
        "Residual p=0": variant_model(model, Variant("Residual p=0", "residual", p_zero=True)),
    }
    touch = ops._needs_touch
    times: dict[str, list[float]] = {k: [] for k in models}

    def step(name: str, seed: int) -> float:
        net = models[name].train()
        ops._needs_touch = (lambda: False) if name == "Residual, grads None" else touch
        torch.manual_seed(seed)  # the same gate draws for every way
        if name == "kept blocks only":
            draw()
        net.zero_grad(set_to_none=True)
        t = time.perf_counter()
        nn.functional.cross_entropy(net(x), y).backward()
        return time.perf_counter() - t

    try:
        for i in range(3):  # warm-up
            for name in models:
                step(name, i)
        for i in range(args.reps):
            order = list(models) if i % 2 == 0 else list(reversed(models))
            for name in order:
                times[name].append(step(name, 1000 + i))
    finally:
        ops._needs_touch = touch
    base = times["plain"]

    def ratio(name: str) -> float:
        return statistics.median(t / b for t, b in zip(times[name], base, strict=True))

    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.reps} reps, load "
        f"{os.getloadavg()[0]:.2f}"
    )
    for name, t in times.items():
        print(f"{name:22s} median {1000 * statistics.median(t):7.1f} ms  ratio {ratio(name):.3f}")
    shipped, no_touch, floor = (
        ratio("Residual"),
        ratio("Residual, grads None"),
        ratio("kept blocks only"),
    )
    print(
        f"breakdown of Residual's {shipped:.3f}: the kept work {floor:.3f}, the zero-gradient "
        f"touch {shipped - no_touch:+.3f}, droppath's step otherwise {no_touch - floor:+.3f}"
    )


if __name__ == "__main__":
    main()
