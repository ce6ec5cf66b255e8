"""``droppath bench``: the time and memory of a training step, drop path variants side by side.

Every variant trains the same stack (same weights, same input) and the variants are interleaved
in one process, in a rotating order, after warm-up; the table shows medians and ratios to the
plain residual (no drop path at all).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from droppath._checks import check_bucket, check_choice, check_positive_int, check_probability
from droppath._progress import Progress
from droppath.models.resnet import CifarResNet
from droppath.models.vit import SmallViT, _Attention, _mlp
from droppath.residual import Residual
from droppath.schedules import depth_rates

__all__ = ["BenchConfig", "format_table", "run_bench"]

KINDS = ("mlp", "attn", "conv", "vit")
RULES = ("uniform", "linear")


class PlainResidual(nn.Module):
    """``shortcut(x) + branch(x)``: the baseline with no stochastic depth."""

    def __init__(self, block: Residual) -> None:
        super().__init__()
        self.branch, self.shortcut = block.branch, block.shortcut

    def forward(self, x: Tensor) -> Tensor:
        base = x if self.shortcut is None else self.shortcut(x)
        out: Tensor = base + self.branch(x)
        return out


class MaskMultiplyResidual(PlainResidual):
    """The formulation of timm, torchvision and mmcv: compute every row, multiply by a mask."""

    def __init__(self, block: Residual) -> None:
        super().__init__(block)
        self.p, self.mode = block.p, block.mode

    def forward(self, x: Tensor) -> Tensor:
        base = x if self.shortcut is None else self.shortcut(x)
        out: Tensor = self.branch(x)
        if self.training and self.p > 0.0:
            keep = 1.0 - self.p
            shape = (out.shape[0],) + (1,) * (out.dim() - 1) if self.mode == "row" else (1,)
            mask = out.new_empty(shape).bernoulli_(keep)
            if keep > 0.0:
                mask.div_(keep)
            out = out * mask
        result: Tensor = base + out
        return result


@dataclass
class BenchConfig:
    kind: str = "mlp"
    depth: int | None = None
    batch: int = 64
    width: int | None = None
    tokens: int = 32
    p: float = 0.5
    rule: str = "uniform"
    mode: str = "row"
    reps: int = 20
    warmup: int = 3
    threads: int | None = None
    seed: int = 0
    compile: bool = False
    bucket: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", KINDS)
        check_choice(self.rule, "rule", RULES)
        check_choice(self.mode, "mode", ("row", "batch"))
        self.p = check_probability(self.p)
        if self.depth is None:
            self.depth = {"conv": 54, "vit": 6}.get(self.kind, 12)
        if self.width is None:
            self.width = 16 if self.kind == "conv" else 192
        self.depth = check_positive_int(self.depth, "depth")
        if self.kind == "conv" and self.depth % 3:
            raise ValueError(f"depth must be a multiple of 3 for kind 'conv', got {self.depth}")
        self.width = check_positive_int(self.width, "width")
        self.batch = check_positive_int(self.batch, "batch")
        self.tokens = check_positive_int(self.tokens, "tokens")
        self.reps = check_positive_int(self.reps, "reps")
        self.warmup = check_positive_int(self.warmup, "warmup", minimum=0)
        self.bucket = check_bucket(self.bucket)


@dataclass
class VariantResult:
    name: str
    variant: dict[str, Any]
    step_ms: float
    ratio: float
    memory_mb: float
    memory_ratio_to_mask_multiply: float
    times_ms: list[float] = field(repr=False)


def _build(cfg: BenchConfig) -> tuple[nn.Module, Tensor]:
    rates = depth_rates(cfg.depth or 1, cfg.p, cfg.rule)
    width = cfg.width or 1
    if cfg.kind == "conv":
        model: nn.Module = CifarResNet(
            2 * (cfg.depth or 3) + 2,
            widths=(width, 2 * width, 4 * width),
            mode=cfg.mode,
        )
        blocks = [m for m in model.modules() if isinstance(m, Residual)]
        for block, rate in zip(blocks, rates, strict=True):
            block.p = rate
        x = torch.randn(cfg.batch, 3, 32, 32)
        return model, x
    if cfg.kind == "vit":  # a small ViT on 32x32 images: patch 4, 64 tokens + class token
        heads = max(1, width // 64)
        vit = SmallViT(dim=width, depth=cfg.depth or 1, heads=heads, p=cfg.p, rule=cfg.rule)
        for site in vit.modules():
            if isinstance(site, Residual):
                site.mode = cfg.mode
        return vit, torch.randn(cfg.batch, 3, 32, 32)
    heads = max(1, width // 64)
    make: Callable[[], nn.Module]
    if cfg.kind == "mlp":
        make = lambda: _mlp(width, 4 * width)  # noqa: E731
    else:
        make = lambda: _Attention(width, heads)  # noqa: E731
    model = nn.Sequential(*[Residual(make(), rate, mode=cfg.mode) for rate in rates])
    return model, torch.randn(cfg.batch, cfg.tokens, width)


@dataclass(frozen=True)
class Variant:
    """One way to compute the residual stack: a label for the table and what it means."""

    label: str
    kind: str  # "plain", "mask-multiply" or "residual"
    strategy: str = "auto"
    p_zero: bool = False  # Residual with every rate set to 0: its overhead when nothing drops
    bucket: int | None = None


def variants(mode: str, bucket: int | None = None) -> list[Variant]:
    """The variants a bench run compares, the baseline first."""
    out = [Variant("plain", "plain"), Variant("mask-multiply", "mask-multiply")]
    if mode == "batch":
        out.append(Variant("Residual", "residual"))
    else:
        out += [
            Variant(f"Residual {s}", "residual", strategy=s) for s in ("mask", "subset", "auto")
        ]
        if bucket is not None:
            out.append(Variant(f"Residual bucket={bucket}", "residual", "subset", bucket=bucket))
    out.append(Variant("Residual p=0", "residual", p_zero=True))
    return out


def _variant(model: nn.Module, variant: Variant) -> nn.Module:
    """A copy of ``model`` whose ``Residual`` blocks compute as ``variant``.

    The copy shares the parameters and buffers of ``model``: every variant computes with the same
    tensors in memory, so none is favoured by where its weights happen to lie.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = copy.deepcopy(model, memo=shared)
    for parent in list(out.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, Residual):
                continue
            if variant.kind == "plain":
                setattr(parent, child_name, PlainResidual(child))
            elif variant.kind == "mask-multiply":
                setattr(parent, child_name, MaskMultiplyResidual(child))
            else:
                child.strategy, child.bucket = variant.strategy, variant.bucket
                if variant.p_zero:
                    child.p = 0.0
    return out


def _step(model: nn.Module, x: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss = model(x).float().square().mean()
    if loss.requires_grad:  # a batch-mode step of a stack can drop every block
        loss.backward()


def _eval_step(model: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        model(x)


def _activation_bytes(model: nn.Module, x: Tensor) -> int:
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
        loss = model(x).float().square().mean()
    if loss.requires_grad:
        loss.backward()
    return sum(seen.values())


def _peak_memory(model: nn.Module, x: Tensor, reps: int) -> float:
    """Median peak memory of a step in MB: CUDA's allocator peak, else bytes saved for backward."""
    values = []
    for _ in range(reps):
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _step(model, x)
            torch.cuda.synchronize()
            values.append(torch.cuda.max_memory_allocated() - before)
        else:
            values.append(_activation_bytes(model, x))
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


def _paired_ratio(times: list[float], baseline: list[float]) -> float:
    """The median over repetitions of ``times[r] / baseline[r]``.

    Both were measured in the same repetition, moments apart, so each ratio cancels the slow
    drifts of a shared machine that a ratio of two overall medians would keep.
    """
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(
    cfg: BenchConfig, device: str | torch.device = "cpu", progress: bool = True
) -> dict[str, Any]:
    """Time every variant, interleaved, and return the results as plain data."""
    dev = torch.device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    base, x = _build(cfg)
    base, x = base.to(dev), x.to(dev)
    if cfg.kind == "conv" and dev.type == "cuda":  # cuDNN's fast layout; on CPUs, NCHW
        base = base.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    order = variants(cfg.mode, cfg.bucket)
    names = [v.label for v in order]
    models = {v.label: _variant(base, v).train() for v in order}
    residual = next(v.label for v in order if v.kind == "residual" and v.strategy == "auto")
    eval_labels = {"plain": "plain", "Residual": residual}
    if cfg.compile:
        torch._dynamo.reset()
        runners = {n: cast(nn.Module, torch.compile(m)) for n, m in models.items()}
    else:
        runners = dict(models)

    times: dict[str, list[float]] = {name: [] for name in names}
    eval_times: dict[str, list[float]] = {name: [] for name in eval_labels}
    bar = Progress((cfg.warmup + cfg.reps) * (len(names) + 2), "bench") if progress else None
    for rep in range(cfg.warmup + cfg.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # rotate: no variant always runs first
            seconds = _timed(lambda: _step(runners[name], x), dev)  # noqa: B023
            if rep >= cfg.warmup:
                times[name].append(seconds)
            if bar:
                bar.update(1)
        for name, label in eval_labels.items():
            models[label].eval()
            seconds = _timed(lambda: _eval_step(runners[label], x), dev)  # noqa: B023
            models[label].train()
            if rep >= cfg.warmup:
                eval_times[name].append(seconds)
            if bar:
                bar.update(1)
    if bar:
        bar.close()

    memory = {name: _peak_memory(runners[name], x, 3) for name in names}
    mm_mem = memory["mask-multiply"]
    results = [
        asdict(
            VariantResult(
                name=v.label,
                variant=asdict(v),
                step_ms=1e3 * statistics.median(times[v.label]),
                ratio=_paired_ratio(times[v.label], times["plain"]),
                memory_mb=memory[v.label],
                memory_ratio_to_mask_multiply=memory[v.label] / mm_mem if mm_mem else float("nan"),
                times_ms=[1e3 * s for s in times[v.label]],
            )
        )
        for v in order
    ]
    eval_plain = statistics.median(eval_times["plain"])
    eval_res = statistics.median(eval_times["Residual"])
    eval_ratio = _paired_ratio(eval_times["Residual"], eval_times["plain"])
    rates = depth_rates(cfg.depth or 1, cfg.p, cfg.rule)
    return {
        "config": asdict(cfg),
        "machine": machine_info(dev),
        "kept_fraction": sum(1 - r for r in rates) / len(rates),
        "results": results,
        "eval": {
            "plain_ms": 1e3 * eval_plain,
            "residual_ms": 1e3 * eval_res,
            "ratio": eval_ratio,
        },
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    cfg = report["config"]
    memory_label = "peak MB" if report["machine"]["device"].startswith("cuda") else "saved MB"
    lines = [
        f"kind={cfg['kind']} depth={cfg['depth']} batch={cfg['batch']} width={cfg['width']} "
        f"p={cfg['p']} rule={cfg['rule']} mode={cfg['mode']} reps={cfg['reps']} "
        f"(kept fraction {report['kept_fraction']:.3f}; torch {report['machine']['torch']}, "
        f"{report['machine']['device']}, {report['machine']['torch_threads']} threads)",
        "",
        f"| variant | step ms (median) | vs plain (median of paired ratios) | {memory_label} | "
        "memory vs mask-multiply |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {r['step_ms']:.1f} | {r['ratio']:.3f} | {r['memory_mb']:.1f} | "
            f"{r['memory_ratio_to_mask_multiply']:.3f} |"
        )
    ev = report["eval"]
    lines.append(
        f"| eval forward: Residual vs plain | {ev['residual_ms']:.1f} | {ev['ratio']:.3f} | | |"
    )
    return "\n".join(lines)


def bench_command(ns: Any) -> int:
    from droppath.cli import UsageError, config_from_args

    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device must be 'cpu' on this machine (no CUDA), got {ns.device!r}")
    cfg = config_from_args(BenchConfig, ns)
    report = run_bench(cfg, device=ns.device, progress=not ns.no_progress)
    print(format_table(report))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
