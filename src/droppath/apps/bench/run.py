"""``droppath bench``: the time and memory of a training step, drop path variants side by side.

Every variant trains the same stack (same weights, same input) and the variants are interleaved
in one process, in a rotating order, after warm-up; the table shows medians and ratios to the
plain residual (no drop path at all).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from droppath._checks import (
    MODES,
    check_bucket,
    check_choice,
    check_positive_int,
    check_probability,
)
from droppath._progress import progress_bar
from droppath.acceleration import accelerate
from droppath.models.resnet import CifarResNet
from droppath.models.vit import AttentionBranch, SmallViT, mlp_branch
from droppath.residual import Residual
from droppath.schedules import DEPTH_RULES, _rate, depth_rates, drop_path_sites, set_drop_rates

__all__ = [
    "BenchConfig",
    "check_device",
    "check_memory",
    "estimate_step_bytes",
    "format_table",
    "run_bench",
    "write_json",
]

KINDS = ("mlp", "attn", "conv", "vit", "llama")


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


LIBRARIES = ("timm", "torchvision", "transformers")


@dataclass
class BenchConfig:
    """What ``droppath bench`` times: a stack of ``kind``, or with ``model`` ("timm:NAME",
    "torchvision:NAME" or "transformers:MODEL_TYPE") a library's model, original vs
    :func:`droppath.accelerate`, at the library's own rates for ``p`` on ``image``-pixel images."""

    kind: str = "mlp"
    depth: int | None = None
    batch: int | None = None
    width: int | None = None
    tokens: int | None = None
    p: float = 0.5
    rule: str | None = None
    mode: str | None = None
    reps: int = 20
    warmup: int = 3
    threads: int | None = None
    seed: int = 0
    compile: bool = False
    bucket: int | None = None
    model: str | None = None
    image: int | None = None

    def __post_init__(self) -> None:
        self.p = check_probability(self.p)
        self.reps = check_positive_int(self.reps, "reps")
        self.warmup = check_positive_int(self.warmup, "warmup", minimum=0)
        if self.threads is not None:
            self.threads = check_positive_int(self.threads, "threads")
        if self.model is not None:
            self._check_model()
            return
        if self.image is not None:
            raise ValueError("image applies to a library model only (model='timm:NAME', ...)")
        self.rule = "uniform" if self.rule is None else self.rule
        self.mode = "row" if self.mode is None else self.mode
        check_choice(self.kind, "kind", KINDS)
        check_choice(self.rule, "rule", DEPTH_RULES)
        check_choice(self.mode, "mode", MODES)
        if self.depth is None:
            self.depth = {"conv": 54, "vit": 6, "llama": 8}.get(self.kind, 12)
        if self.width is None:
            self.width = {"conv": 16, "llama": 256}.get(self.kind, 192)
        self.depth = check_positive_int(self.depth, "depth")
        if self.kind == "conv" and self.depth % 3:
            raise ValueError(f"depth must be a multiple of 3 for kind 'conv', got {self.depth}")
        self.width = check_positive_int(self.width, "width")
        llama = self.kind == "llama"
        self.batch = check_positive_int(self.batch or (16 if llama else 64), "batch")
        self.tokens = check_positive_int(self.tokens or (128 if llama else 32), "tokens")
        self.bucket = check_bucket(self.bucket)
        heads = max(1, self.width // 64)
        if self.kind in ("attn", "vit", "llama") and self.width % heads:
            raise ValueError(
                f"width must be a multiple of the {heads} attention heads (width // 64) for kind "
                f"{self.kind!r}, got {self.width}"
            )

    def _check_model(self) -> None:
        """The checks of a library model's bench; the stack's options do not apply to it."""
        library, _, name = str(self.model).partition(":")
        if library not in LIBRARIES or not name:
            raise ValueError(
                f"model must be LIBRARY:NAME with LIBRARY one of {', '.join(LIBRARIES)}, "
                f"got {self.model!r}"
            )
        given = [
            f
            for f, v in (
                ("depth", self.depth),
                ("width", self.width),
                ("tokens", self.tokens),
                ("rule", self.rule),
                ("mode", self.mode),
                ("bucket", self.bucket),
            )
            if v is not None
        ]
        if self.kind != "mlp" and self.kind != "model":
            given.insert(0, "kind")
        if given:
            verb = "does" if len(given) == 1 else "do"
            raise ValueError(
                f"{', '.join(given)} {verb} not apply to a library model (it has its own blocks "
                f"and rates), got with model={self.model!r}"
            )
        self.kind = "model"
        self.batch = check_positive_int(self.batch or 32, "batch")
        self.image = check_positive_int(self.image or 96, "image")


@dataclass
class VariantResult:
    name: str
    variant: dict[str, Any]
    step_ms: float
    ratio: float
    memory_mb: float
    memory_ratio_to_mask_multiply: float
    times_ms: list[float] = field(repr=False)


class _LibraryModel(nn.Module):
    """A timm, torchvision or Hugging Face model as a module from images to one tensor (its
    logits, or its last hidden state)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        if isinstance(y, Tensor):
            return y
        out: Tensor = y.last_hidden_state if hasattr(y, "last_hidden_state") else y[0]
        return out


def _build_library_model(cfg: BenchConfig) -> tuple[nn.Module, Tensor]:
    """The library's model with its own drop-path rates for ``p`` (``drop_path_rate``,
    ``stochastic_depth_prob``), random weights, and a batch of ``image``-pixel images."""
    library, _, name = str(cfg.model).partition(":")
    try:
        lib = importlib.import_module(library)
    except ImportError:
        raise ValueError(f"model {cfg.model!r} needs {library}: pip install {library}") from None
    size = cfg.image or 96
    net: nn.Module
    if library == "timm":
        try:
            net = lib.create_model(name, pretrained=False, drop_path_rate=cfg.p, img_size=size)
        except TypeError:  # a model without a fixed input size (ConvNeXt, ResNet, ...)
            net = lib.create_model(name, pretrained=False, drop_path_rate=cfg.p)
        except RuntimeError as e:
            raise ValueError(f"model must name a timm model, got {cfg.model!r}: {e}") from None
    elif library == "torchvision":
        models = importlib.import_module("torchvision.models")
        if not callable(getattr(models, name, None)):
            raise ValueError(f"model must name a torchvision model, got {cfg.model!r}")
        try:
            net = getattr(models, name)(stochastic_depth_prob=cfg.p)
        except TypeError:  # swin_t, maxvit_t: the builder fixes the rate; torchvision's linspace
            net = getattr(models, name)()
            set_drop_rates(net, cfg.p, "linspace")
    else:
        try:
            config = lib.AutoConfig.for_model(name, drop_path_rate=cfg.p, image_size=size)
        except ValueError as e:
            raise ValueError(f"model must name a transformers model type: {e}") from None
        net = lib.AutoModel.from_config(config)
    return _LibraryModel(net), torch.randn(cfg.batch or 1, 3, size, size)


def _build(cfg: BenchConfig) -> tuple[nn.Module, Tensor]:
    if cfg.kind == "model":
        return _build_library_model(cfg)
    rates = depth_rates(cfg.depth or 1, cfg.p, cfg.rule or "uniform")
    width = cfg.width or 1
    if cfg.kind == "conv":
        model: nn.Module = CifarResNet(
            2 * (cfg.depth or 3) + 2,
            widths=(width, 2 * width, 4 * width),
            mode=cfg.mode or "row",
        )
        blocks = [m for m in model.modules() if isinstance(m, Residual)]
        for block, rate in zip(blocks, rates, strict=True):
            block.p = rate
        x = torch.randn(cfg.batch or 1, 3, 32, 32)
        return model, x
    if cfg.kind == "llama":
        return _build_llama(cfg)
    if cfg.kind == "vit":  # a small ViT on 32x32 images: patch 4, 64 tokens + class token
        heads = max(1, width // 64)
        vit = SmallViT(
            dim=width, depth=cfg.depth or 1, heads=heads, p=cfg.p, rule=cfg.rule or "uniform"
        )
        for site in vit.modules():
            if isinstance(site, Residual):
                site.mode = cfg.mode or "row"
        return vit, torch.randn(cfg.batch or 1, 3, 32, 32)
    heads = max(1, width // 64)
    make: Callable[[], nn.Module]
    if cfg.kind == "mlp":
        make = lambda: mlp_branch(width, 4 * width)  # noqa: E731
    else:
        make = lambda: AttentionBranch(width, heads)  # noqa: E731
    model = nn.Sequential(*[Residual(make(), rate, mode=cfg.mode or "row") for rate in rates])
    return model, torch.randn(cfg.batch or 1, cfg.tokens or 1, width)


class _LanguageModelLoss(nn.Module):
    """A Hugging Face causal LM as a module from token ids to its training loss."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        loss: Tensor = self.lm(input_ids=ids, labels=ids, use_cache=False).loss
        return loss


def _build_llama(cfg: BenchConfig) -> tuple[nn.Module, Tensor]:
    """A small Llama (Hugging Face transformers, random weights): ``depth`` layers of width
    ``width``, MLP 4x, vocabulary 512, so that the layers and not the LM head hold the work."""
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "kind 'llama' needs Hugging Face transformers: pip install transformers"
        ) from None
    width, depth = cfg.width or 256, cfg.depth or 8
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // 64),
        num_key_value_heads=max(1, width // 64),
        max_position_embeddings=max(cfg.tokens or 128, 128),
    )
    model = _LanguageModelLoss(transformers.LlamaForCausalLM(config))
    ids = torch.randint(0, 512, (cfg.batch or 16, cfg.tokens or 128))
    return model, ids


class TorchtuneLayerDropout(nn.Module):
    """torchtune's ``LayerDropout`` (``torchtune/modules/layer_dropout.py``), rewritten here with
    the same behaviour as a baseline: one Bernoulli(``prob``) skip per sample from a CPU generator
    seeded per layer; the layer runs on the kept rows of the hidden states, every other argument
    passed as it is (not gathered); kept rows written into a clone of the input, not rescaled
    (training computes ``x + (1 - p) f(x)`` on average where eval computes ``x + f(x)``)."""

    def __init__(self, layer: nn.Module, prob: float, seed: int) -> None:
        super().__init__()
        self.layer, self.prob = layer, prob
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.prob == 0 or not self.training:
            return self.layer(x, *args, **kwargs)
        n = x.shape[0]
        skip = torch.bernoulli(torch.full((n,), self.prob), generator=self.generator)
        selected = (skip == 0).nonzero().squeeze(1).to(x.device)
        out = x.clone()
        if selected.numel() > 0:
            out[selected] = self.layer(x.index_select(0, selected), *args, **kwargs)
        return out


@dataclass(frozen=True)
class Variant:
    """One way to compute the model: a label for the table and what it means."""

    label: str
    # "plain", "mask-multiply", "residual", "torchtune", "layer_drop", or for a library model
    # "original" and "accelerate"
    kind: str
    strategy: str = "auto"
    p_zero: bool = False  # Residual with every rate set to 0: its overhead when nothing drops
    bucket: int | None = None


def variants(mode: str, bucket: int | None = None, kind: str = "mlp") -> list[Variant]:
    """The variants a bench run compares, the baseline first."""
    if kind == "model":
        return [
            Variant("original", "original"),
            Variant("accelerate", "accelerate"),
            Variant("accelerate p=0", "accelerate", p_zero=True),
        ]
    if kind == "llama":
        return [
            Variant("plain", "plain"),
            Variant("torchtune LayerDropout", "torchtune"),
            Variant("layer_drop", "layer_drop"),
            Variant("layer_drop p=0", "layer_drop", p_zero=True),
        ]
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


def _layer_variant(
    model: _LanguageModelLoss, variant: Variant, rates: list[float]
) -> _LanguageModelLoss:
    """The language model computing as ``variant``: its layers plain, wrapped in torchtune's
    ``LayerDropout``, or made layer-drop sites by :func:`droppath.layer_drop`."""
    from droppath.layerdrop import find_layer_stack, layer_drop

    _, stack = find_layer_stack(model.lm)
    if variant.kind == "torchtune":
        for i, rate in enumerate(rates):
            stack[i] = TorchtuneLayerDropout(stack[i], rate, seed=i)
    elif variant.kind == "layer_drop":
        layer_drop(model.lm, [0.0] * len(rates) if variant.p_zero else rates)
    return model


def _variant(model: nn.Module, variant: Variant, rates: list[float] | None = None) -> nn.Module:
    """A copy of ``model`` whose ``Residual`` blocks compute as ``variant``.

    The copy shares the parameters and buffers of ``model``: every variant computes with the same
    tensors in memory, so none is favoured by where its weights happen to lie.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = copy.deepcopy(model, memo=shared)
    if isinstance(out, _LanguageModelLoss):
        return _layer_variant(out, variant, rates or [])
    if isinstance(out, _LibraryModel):
        if variant.kind == "accelerate":
            accelerate(out.net)
            if variant.p_zero:
                set_drop_rates(out.net, 0.0)
        return out
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


def _prepare(
    cfg: BenchConfig, dev: torch.device
) -> tuple[list[Variant], dict[str, nn.Module], dict[str, nn.Module], Tensor]:
    """The variants, their models (sharing one set of weights), what runs them (compiled or
    not) and the input, on ``dev``."""
    torch.manual_seed(cfg.seed)
    base, x = _build(cfg)
    base, x = base.to(dev), x.to(dev)
    if cfg.kind == "conv" and dev.type == "cuda":  # cuDNN's fast layout; on CPUs, NCHW
        base = base.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    order = variants(cfg.mode or "row", cfg.bucket, cfg.kind)
    rates = _rates(cfg, base)
    models = {v.label: _variant(base, v, rates).train() for v in order}
    if cfg.compile:
        torch._dynamo.reset()
        runners = {n: cast(nn.Module, torch.compile(m)) for n, m in models.items()}
    else:
        runners = dict(models)
    return order, models, runners, x


def _rates(cfg: BenchConfig, model: nn.Module) -> list[float]:
    """The drop rate of every site: by the depth rule, or the library model's own."""
    if cfg.kind == "model":
        return [_rate(site) for _, site in drop_path_sites(model)]
    return depth_rates(cfg.depth or 1, cfg.p, cfg.rule or "uniform")


def _interleaved_times(
    cfg: BenchConfig,
    models: dict[str, nn.Module],
    runners: dict[str, nn.Module],
    eval_labels: dict[str, str],
    x: Tensor,
    dev: torch.device,
    progress: bool,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of each training step by variant, and of each eval forward, after warm-up; the
    variants take turns in a rotating order, so that none always runs first."""
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    eval_times: dict[str, list[float]] = {name: [] for name in eval_labels}
    bar = progress_bar((cfg.warmup + cfg.reps) * (len(names) + 2), "bench", progress)
    for rep in range(cfg.warmup + cfg.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
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
    return times, eval_times


def run_bench(
    cfg: BenchConfig, device: str | torch.device = "cpu", progress: bool = True
) -> dict[str, Any]:
    """Time every variant, interleaved, and return the results as plain data."""
    dev = torch.device(device)
    check_memory(cfg, dev)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    order, models, runners, x = _prepare(cfg, dev)
    ours = next(  # droppath's default: Residual's auto strategy, layer_drop, or accelerate
        v.label
        for v in order
        if v.kind in ("residual", "layer_drop", "accelerate")
        and v.strategy == "auto"
        and not v.p_zero
    )
    eval_labels = {"plain": order[0].label, "Residual": ours}
    times, eval_times = _interleaved_times(cfg, models, runners, eval_labels, x, dev, progress)
    memory = {v.label: _peak_memory(runners[v.label], x, 3) for v in order}
    mm_mem = memory.get("mask-multiply", memory[order[0].label])
    results = [
        asdict(
            VariantResult(
                name=v.label,
                variant=asdict(v),
                step_ms=1e3 * statistics.median(times[v.label]),
                ratio=_paired_ratio(times[v.label], times[order[0].label]),
                memory_mb=memory[v.label],
                memory_ratio_to_mask_multiply=memory[v.label] / mm_mem if mm_mem else float("nan"),
                times_ms=[1e3 * s for s in times[v.label]],
            )
        )
        for v in order
    ]
    rates = _rates(cfg, models[ours])  # a library model's: with the filled slots
    return {
        "config": asdict(cfg),
        "machine": machine_info(dev),
        "kept_fraction": sum(1 - r for r in rates) / len(rates),
        "results": results,
        "eval": {
            "plain_ms": 1e3 * statistics.median(eval_times["plain"]),
            "residual_ms": 1e3 * statistics.median(eval_times["Residual"]),
            "ratio": _paired_ratio(eval_times["Residual"], eval_times["plain"]),
        },
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    cfg = report["config"]
    memory_label = "peak MB" if report["machine"]["device"].startswith("cuda") else "saved MB"
    machine = report["machine"]
    where = f"torch {machine['torch']}, {machine['device']}, {machine['torch_threads']} threads"
    kept = f"kept fraction {report['kept_fraction']:.3f}"
    if cfg["kind"] == "model":
        head = (
            f"model={cfg['model']} image={cfg['image']} batch={cfg['batch']} p={cfg['p']} "
            f"(the library's own rates) reps={cfg['reps']} ({kept}; {where})"
        )
        baseline, memory_baseline = "original", "original"
    else:
        head = (
            f"kind={cfg['kind']} depth={cfg['depth']} batch={cfg['batch']} width={cfg['width']} "
            f"p={cfg['p']} rule={cfg['rule']} mode={cfg['mode']} reps={cfg['reps']} "
            f"({kept}; {where})"
        )
        baseline = "plain"
        memory_baseline = "mask-multiply" if cfg["kind"] != "llama" else "plain"
    lines = [
        head,
        "",
        f"| variant | step ms (median) | vs {baseline} (median of paired ratios) | "
        f"{memory_label} | memory vs {memory_baseline} |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {r['step_ms']:.1f} | {r['ratio']:.3f} | {r['memory_mb']:.1f} | "
            f"{r['memory_ratio_to_mask_multiply']:.3f} |"
        )
    ev = report["eval"]
    lines.append(
        f"| eval forward: droppath vs {baseline} | {ev['residual_ms']:.1f} | {ev['ratio']:.3f} "
        "| | |"
    )
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``report`` to ``path`` atomically: a reader never sees half a file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, target)


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be 'cpu' on this machine (no CUDA), got {device!r}")
    return dev
