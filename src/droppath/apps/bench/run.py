"""``droppath bench``'s run: build the variants of one model, time them interleaved, and return
the results as plain data (``run_bench``)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from droppath.acceleration import check_states
from droppath.ahead import draw_ahead
from droppath.apps.bench.config import BenchConfig
from droppath.apps.bench.models import build_model
from droppath.apps.bench.report import machine_info
from droppath.apps.bench.timing import (
    Setup,
    check_memory,
    interleaved_times,
    paired_ratio,
    peak_memory,
    step_flops,
)
from droppath.apps.bench.variants import variant_model, variants
from droppath.rates import depth_rates
from droppath.sites import drop_path_sites, site_rate

__all__ = ["VariantResult", "prepare", "run_bench"]


@dataclass
class VariantResult:
    """One variant's row of the report: its medians, ratios and every timed step."""

    name: str
    variant: dict[str, Any]
    step_ms: float
    ratio: float
    memory_mb: float
    memory_ratio_to_mask_multiply: float
    times_ms: list[float] = field(repr=False)
    auto_choices: dict[str, int] = field(default_factory=dict)
    # accelerated blocks that fell back to the mask, by name: why (their check failed)
    fallbacks: dict[str, str] = field(default_factory=dict)


def prepare(cfg: BenchConfig, dev: torch.device) -> Setup:
    """The variants, their models (sharing one set of weights), what runs them (compiled or
    not) and the input, on ``dev``."""
    torch.manual_seed(cfg.seed)
    base, x = build_model(cfg)
    base, x = base.to(dev), x.to(dev)
    if cfg.channels_last or (cfg.kind == "conv" and dev.type == "cuda"):  # cuDNN's fast layout
        base = base.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    order = variants(cfg.mode or "row", cfg.bucket, cfg.kind, compiled=cfg.compile)
    rates = _rates(cfg, base)
    models = {v.label: variant_model(base, v, rates).train() for v in order}
    if cfg.compile:
        torch._dynamo.reset()
        backend = cfg.compile_backend
        for m in models.values():  # each Residual's step in the model's graph
            draw_ahead(m)
        runners = {n: cast(nn.Module, torch.compile(m, backend=backend)) for n, m in models.items()}
    else:
        runners = dict(models)
    autocast = getattr(torch, cfg.autocast) if cfg.autocast else None
    return Setup(order, models, runners, x, dev, autocast)


def auto_choices(model: nn.Module) -> dict[str, int]:
    """How many of the model's sites with ``strategy="auto"`` took the row subset, the mask, or
    are still measuring (``"pending"``), after the timed steps."""
    counts: dict[str, int] = {}
    for module in model.modules():
        choice = getattr(module, "auto_choice", None)
        if isinstance(choice, str):
            counts[choice] = counts.get(choice, 0) + 1
    return counts


def fallbacks(model: nn.Module) -> dict[str, str]:
    """The accelerated blocks of ``model`` whose check failed, after the timed steps: they ran
    every row (the mask), by module name, with the reason."""
    return {
        name: state.removeprefix("failed: ")
        for name, state in check_states(model).items()
        if state.startswith("failed: ")
    }


def _rates(cfg: BenchConfig, model: nn.Module) -> list[float]:
    """The drop rate of every site: by the depth rule, or the library model's own."""
    if cfg.kind == "model":
        return [site_rate(site) for _, site in drop_path_sites(model)]
    return depth_rates(cfg.depth or 1, cfg.p, cfg.rule or "uniform")


# Steps whose FLOPs are averaged: enough that the mean of a 32-sample batch's draws is within
# about 0.01 of its expectation on the library models measured here.
KEPT_WORK_STEPS = 8


def _kept_work(cfg: BenchConfig, setup: Setup, ours: str) -> dict[str, float]:
    """For a library model, ``kept_work``: the FLOPs of droppath's training step (averaged over
    draws) over those of the original's. Unlike ``kept_fraction`` (the mean keep rate of the
    sites), it counts the work no drop path can skip (stem, downsampling, head) and weighs each
    site by its branch's cost: the floor of the step-time ratio where FLOPs set the time."""
    if cfg.kind != "model":
        return {}
    dtype = setup.autocast
    full = step_flops(setup.models[setup.order[0].label], setup.x, 1, autocast=dtype)
    ours_flops = step_flops(setup.models[ours], setup.x, KEPT_WORK_STEPS, autocast=dtype)
    return {"kept_work": ours_flops / full} if full else {}


def run_bench(
    cfg: BenchConfig, device: str | torch.device = "cpu", progress: bool = True
) -> dict[str, Any]:
    """Time every variant, interleaved, and return the results as plain data."""
    dev = torch.device(device)
    check_memory(cfg, dev)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = prepare(cfg, dev)
    order = setup.order
    ours = next(  # droppath's default: Residual's auto strategy, layer_drop, or accelerate
        v.label
        for v in order
        if v.kind in ("residual", "layer_drop", "accelerate")
        and v.strategy == "auto"
        and not v.p_zero
    )
    eval_labels = {"plain": order[0].label, "Residual": ours}
    times, eval_times = interleaved_times(cfg, setup, eval_labels, progress=progress)
    memory = {
        v.label: peak_memory(setup.runners[v.label], setup.x, 3, autocast=setup.autocast)
        for v in order
    }
    mm_mem = memory.get("mask-multiply", memory[order[0].label])
    results = [
        asdict(
            VariantResult(
                name=v.label,
                variant=asdict(v),
                step_ms=1e3 * statistics.median(times[v.label]),
                ratio=paired_ratio(times[v.label], times[order[0].label]),
                memory_mb=memory[v.label],
                memory_ratio_to_mask_multiply=memory[v.label] / mm_mem if mm_mem else float("nan"),
                times_ms=[1e3 * s for s in times[v.label]],
                auto_choices=auto_choices(setup.models[v.label]),
                fallbacks=fallbacks(setup.models[v.label]),
            )
        )
        for v in order
    ]
    rates = _rates(cfg, setup.models[ours])  # a library model's: with the filled slots
    return {
        "config": asdict(cfg),
        "machine": machine_info(dev),
        "kept_fraction": sum(1 - r for r in rates) / len(rates),
        **_kept_work(cfg, setup, ours),
        "results": results,
        "eval": {
            "plain_ms": 1e3 * statistics.median(eval_times["plain"]),
            "residual_ms": 1e3 * statistics.median(eval_times["Residual"]),
            "ratio": paired_ratio(eval_times["Residual"], eval_times["plain"]),
        },
    }
