"""How a bench measures: training steps of the variants interleaved in a rotating order after
warm-up, timed by the device's clock; paired ratios; the memory of a step."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from droppath.apps.bench.config import BenchConfig
from droppath.apps.bench.variants import Variant
from droppath.apps.progress import progress_bar

__all__ = [
    "Setup",
    "check_memory",
    "estimate_step_bytes",
    "interleaved_times",
    "paired_ratio",
    "peak_memory",
    "step_flops",
]


@dataclass(frozen=True)
class Setup:
    """What a bench times: the variants (the baseline first), their models (sharing one set of
    weights), what runs each (the model, or its compiled form), the input and the device."""

    order: list[Variant]
    models: dict[str, nn.Module]
    runners: dict[str, nn.Module]
    x: Tensor
    device: torch.device
    autocast: torch.dtype | None = None


def _forward(model: nn.Module, x: Tensor, autocast: torch.dtype | None) -> Any:
    """The model's output, under ``torch.autocast`` in ``autocast`` if given (the forward only:
    the backward runs outside it, as PyTorch's AMP recipe has it)."""
    if autocast is None:
        return model(x)
    with torch.autocast(x.device.type, dtype=autocast):
        return model(x)


def _step(model: nn.Module, x: Tensor, autocast: torch.dtype | None = None) -> None:
    """One training step: forward, a loss, backward."""
    model.zero_grad(set_to_none=True)
    loss = _forward(model, x, autocast).float().square().mean()
    if loss.requires_grad:  # a batch-mode step of a stack can drop every block
        loss.backward()


def _eval_step(model: nn.Module, x: Tensor, autocast: torch.dtype | None = None) -> None:
    with torch.no_grad():
        _forward(model, x, autocast)


def _activation_bytes(model: nn.Module, x: Tensor, autocast: torch.dtype | None) -> int:
    """Bytes saved for backward in one training step: the activation memory of the step.

    On a CPU there is no allocator to ask for a peak; what autograd keeps between forward and
    backward is what a drop path variant can save, so it is counted (each storage once).
    """
    seen: dict[tuple[int, str], int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _forward(model, x, autocast).float().square().mean()
    if loss.requires_grad:
        loss.backward()
    return sum(seen.values())


def step_flops(
    model: nn.Module, x: Tensor, reps: int, *, autocast: torch.dtype | None = None
) -> float:
    """Mean floating-point operations of ``reps`` training steps (forward and backward), as
    ``torch.utils.flop_counter`` counts them (matrix products and convolutions). Over steps that
    draw their own keep decisions, the mean is the work a variant does on average."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for _ in range(reps):
        with FlopCounterMode(display=False) as counter:
            _step(model, x, autocast)
        total += counter.get_total_flops()
    return total / reps


def peak_memory(
    model: nn.Module, x: Tensor, reps: int, *, autocast: torch.dtype | None = None
) -> float:
    """Median peak memory of a step in MB: CUDA's allocator peak, else bytes saved for backward."""
    values = []
    for _ in range(reps):
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _step(model, x, autocast)
            torch.cuda.synchronize()
            values.append(torch.cuda.max_memory_allocated() - before)
        else:
            values.append(_activation_bytes(model, x, autocast))
    return statistics.median(values) / 2**20


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds that ``fn`` takes: CUDA events on a GPU (the device's own clock, no host timing of
    queued work), ``time.perf_counter`` on a CPU."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """The median over repetitions of ``times[r] / baseline[r]``.

    Both were measured in the same repetition, moments apart, so each ratio cancels the slow
    drifts of a shared machine that a ratio of two overall medians would keep.
    """
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def interleaved_times(
    cfg: BenchConfig, setup: Setup, eval_labels: dict[str, str], *, progress: bool
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of each training step by variant, and of each eval forward (of the variants
    ``eval_labels`` names), after warm-up; the variants take turns in a rotating order, so that
    none always runs first."""
    models, runners, x, dev = setup.models, setup.runners, setup.x, setup.device
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    eval_times: dict[str, list[float]] = {name: [] for name in eval_labels}
    bar = progress_bar((cfg.warmup + cfg.reps) * (len(names) + 2), "bench", progress)
    for rep in range(cfg.warmup + cfg.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = _timed(lambda: _step(runners[name], x, setup.autocast), dev)  # noqa: B023
            if rep >= cfg.warmup:
                times[name].append(seconds)
            if bar:
                bar.update(1)
        for name, label in eval_labels.items():
            models[label].eval()
            seconds = _timed(
                lambda: _eval_step(runners[label], x, setup.autocast),  # noqa: B023
                dev,
            )
            models[label].train()
            if rep >= cfg.warmup:
                eval_times[name].append(seconds)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return times, eval_times


def estimate_step_bytes(cfg: BenchConfig) -> int:
    """A rough upper estimate of the memory of one training step of ``cfg``'s model: float32
    activations kept for backward, with a margin (a few elements per block and position)."""
    batch, tokens, width, depth = cfg.batch or 1, cfg.tokens or 1, cfg.width or 1, cfg.depth or 1
    if cfg.kind == "conv":  # 32x32 images, channels double as resolution halves: about constant
        per_sample = 32 * 32 * width * depth * 2 * 12
    elif cfg.kind == "vit":  # 64 patches and the class token, two sites per block
        per_sample = 65 * width * depth * 2 * 16
    elif cfg.kind == "llama":  # layers, then the LM head's logits over 512 tokens
        per_sample = tokens * (width * depth * 24 + 512 * 4)
    else:  # mlp (hidden 4x) or attention
        per_sample = tokens * width * depth * 16 + (tokens * tokens * depth * 4)
    return 4 * batch * per_sample


def check_memory(cfg: BenchConfig, device: torch.device) -> None:
    """Refuse a configuration whose step cannot fit the device's memory, before allocating it."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = estimate_step_bytes(cfg)
    if need > 0.8 * total:
        raise ValueError(
            f"batch must fit the {device.type} memory: batch {cfg.batch} of kind {cfg.kind!r} "
            f"needs about {need / 2**30:.1f} GiB for a step, the device has {total / 2**30:.1f} GiB"
        )
