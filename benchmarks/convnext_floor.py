"""How fast row-mode drop path can make timm's ConvNeXt on this machine, and what stops it.

Usage: python benchmarks/convnext_floor.py [--name convnext_tiny] [--image 64] [--batch 16]
[-p 0.5] [--threads 2] [--reps 30] [--warmup 5]

Part 1 times a training step (forward, loss, backward) of three variants, interleaved in a
rotating order and sharing one set of weights, and prints medians and paired ratios:

- **original**: timm's model with ``drop_path_rate = p`` (its mask: every branch runs on every
  sample);
- **accelerate**: the same model after ``droppath.accelerate``;
- **slice subset**: a stand-in for a row subset with no overhead at all. Each block draws how many
  samples it keeps, ``k``, as ``accelerate`` does, runs its branch on the first ``k`` samples of
  its input (a view: no gather, no index bookkeeping, no host-side checks) and adds the result
  into a copy of the input by a slice. Which rows are kept does not change the cost, so this
  times what any row-subset implementation of these blocks could reach: ``accelerate`` can come
  close to it but not beat it. (It is not a valid training step: it always keeps the first rows.)

Part 2 times the backward of one depthwise 7x7 convolution per stage, as the blocks run it (the
channels_last layout that timm's permutes leave), on ``batch`` samples and on half as many. A
backward that takes as long on half the samples is a cost that skipping samples cannot remove.

Needs timm (the ``real`` extra: see the README's "Development").
"""

import argparse
import copy
import statistics
import time
import types
from collections.abc import Callable

import torch
from torch import Tensor, nn

import droppath


def _branch(block: nn.Module, h: Tensor) -> Tensor:
    """The residual branch of timm's ``ConvNeXtBlock`` (``use_conv_mlp=False``)."""
    h = block.conv_dw(h).permute(0, 2, 3, 1)
    h = block.mlp(block.norm(h)).permute(0, 3, 1, 2)
    return h if block.gamma is None else h.mul(block.gamma.reshape(1, -1, 1, 1))


def _slice_subset_forward(block: nn.Module, x: Tensor) -> Tensor:
    p = float(getattr(block.drop_path, "drop_prob", 0.0))
    if not block.training:
        return _branch(block, x) + x
    k = int((torch.rand(x.shape[0]) >= p).sum())
    if k == 0:
        return x
    out = x.clone()
    out[:k] += _branch(block, x[:k]) / (1.0 - p)
    return out


def slice_subset(model: nn.Module) -> nn.Module:
    """``model`` (a timm ConvNeXt) with every block computing as the slice-subset stand-in."""
    blocks = [m for m in model.modules() if type(m).__name__ == "ConvNeXtBlock"]
    if not blocks or any(b.use_conv_mlp or not isinstance(b.shortcut, nn.Identity) for b in blocks):
        raise ValueError("model must be a timm ConvNeXt with linear MLPs and identity shortcuts")
    for block in blocks:
        block.forward = types.MethodType(_slice_subset_forward, block)
    return model


def build(name: str, p: float) -> dict[str, nn.Module]:
    """The three variants, sharing the original's parameters and buffers."""
    import timm

    original = timm.create_model(name, pretrained=False, drop_path_rate=p).train()
    shared = {id(t): t for t in (*original.parameters(), *original.buffers())}
    accelerated = copy.deepcopy(original, memo=dict(shared))
    droppath.accelerate(accelerated)
    sliced = slice_subset(copy.deepcopy(original, memo=dict(shared)))
    return {"original": original, "accelerate": accelerated, "slice subset": sliced}


def _step(model: nn.Module, x: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).float().square().mean().backward()


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def depthwise_backward_ms(channels: int, size: int, batch: int, reps: int) -> float:
    """Median ms of the backward (input, weight and bias gradients) of a depthwise 7x7
    convolution on a channels_last ``(batch, channels, size, size)`` input."""
    conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = conv(x)
    grad = torch.randn_like(y)
    return _median_ms(lambda: torch.autograd.grad(y, (x, *conv.parameters()), grad, True), reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="convnext_tiny", help="a timm ConvNeXt")
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("-p", type=float, default=0.5, help="drop_path_rate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build(args.name, args.p)
    x = torch.randn(args.batch, 3, args.image, args.image)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.warmup + args.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            _step(models[name], x)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    print(
        f"timm:{args.name}, image {args.image}, batch {args.batch}, drop_path_rate {args.p}, "
        f"{args.threads} thread(s), {args.reps} reps"
    )
    base = times["original"]
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base, strict=True))
        print(f"  {name:13s} {statistics.median(times[name]) * 1e3:8.1f} ms   {ratio:.3f}")
    print("depthwise 7x7 backward, channels_last (ms):")
    blocks = [m for m in models["original"].modules() if type(m).__name__ == "ConvNeXtBlock"]
    seen = []
    size = args.image // 4
    for block in blocks:
        channels = block.conv_dw.in_channels
        if channels in seen:
            continue
        if seen:
            size = max(1, size // 2)
        seen.append(channels)
        full = depthwise_backward_ms(channels, size, args.batch, args.reps)
        half = depthwise_backward_ms(channels, size, args.batch // 2, args.reps)
        print(
            f"  {channels:4d} channels, {size}x{size}: {args.batch} samples {full:6.2f}, "
            f"{args.batch // 2} samples {half:6.2f} ({half / full:.2f})"
        )


if __name__ == "__main__":
    main()
