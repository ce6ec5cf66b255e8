"""The distributed matrix of issue 26: droppath under DDP, FSDP2 (per block and per branch, in
both orders with ``accelerate``), FSDP1 (both parameter modes), ``draw_ahead`` with
``torch.compile``, ``layer_drop``, SyncBatchNorm in a branch, Lightning's ``ddp`` and ``fsdp``
strategies with the callback, Hugging Face ``accelerate``'s ``Accelerator``, and DeepSpeed's
ZeRO-3 where DeepSpeed is installed (CI does not install it).

Every case runs in one pair of spawned processes (gloo on CPU), one after another, each in a
process group of its own with a short timeout (``conftest.GLOO_TIMEOUT``): a collective that one
rank never makes fails that case within seconds, and the next case starts afresh. A case that
hangs elsewhere is killed by the watchdog of ``run_two_processes`` and the pair is started again
for the cases after it. Starting the processes (torch, timm, transformers, Lightning) costs more
than the cases themselves, hence one pair for all of them.

Each rank records droppath's decisions (``tests/decisions.py``) and saves its parameters and
last gradients, gathered whole. Then, with no process group, each rank builds the single-process
reference of half of the cases: the same model from the same seed, on the global batch (the
ranks' batches concatenated in rank order), with the same loss normalisation (the mean over the
global batch, which is what averaging the ranks' gradients gives), replaying the ranks'
decisions. The tests compare each rank with the reference and the ranks with each other.

``droppath train`` under ``torchrun`` is tested in ``tests/apps/test_train.py``.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import Progress, init_gloo, require, run_two_processes
from decisions import Record, recording, replaying
from droppath import Residual, accelerate, check, draw_ahead, layer_drop
from droppath.acceleration import check_states

STEPS = 3
CPU = torch.device("cpu")  # FSDP1 runs on the CPU only when told so
LR = 0.05
CASE_LIMIT = 120.0  # seconds for one case (or one reference) before the watchdog kills the pair
STARTUP_LIMIT = 240.0  # seconds to start the pair (each process imports torch)
# Same summation, other order: a gradient differs from the reference's in its last bits
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------------------------
# What a case runs on: the ranks' context, or the reference's


@dataclass
class Ctx:
    """Where a case runs: on ``rank`` of a process group, or, with ``rank`` None, as the
    single-process reference, which has the ranks' results (``ranks``)."""

    rank: int | None
    world: int = 2
    ranks: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)  # the batches this rank ran, by step
    kept: list[Any] = field(default_factory=list)  # objects kept alive (see _worker)

    @property
    def reference(self) -> bool:
        return self.rank is None

    def seed(self, alike: bool = False) -> None:
        """Seed the ranks' random state before training: alike, as droppath's docs said to, or
        per rank, as timm's train.py does. The reference replays the decisions."""
        if self.rank is not None:
            torch.manual_seed(0 if alike else 100 + self.rank)

    def batch(self, step: int, make: Callable[[torch.Generator], tuple[Tensor, ...]]) -> Any:
        """This rank's batch of ``step``, or, for the reference, the ranks' batches
        concatenated in rank order."""
        if self.rank is not None:
            out = make(torch.Generator().manual_seed(1000 * step + self.rank))
            self.inputs.append(out)
            return out
        return _cat([make(torch.Generator().manual_seed(1000 * step + r)) for r in range(2)])


def _cat(parts: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))


_WRAPPERS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def _clean(name: str) -> str:
    """A parameter's name without the segments wrappers add."""
    return ".".join(s for s in name.split(".") if s not in _WRAPPERS)


def _whole(t: Tensor | None) -> Tensor | None:
    """``t`` whole (an FSDP2 shard gathered), detached, as a plain tensor."""
    if t is None:
        return None
    full = getattr(t, "full_tensor", None)
    if callable(full):
        t = full()
    return t.detach().clone()


def _state(model: nn.Module, fsdp1: nn.Module | None = None, grads: bool = True) -> dict:
    """The model's parameters and gradients, whole, by their names in the plain model."""
    if fsdp1 is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(fsdp1, writeback=False, with_grads=grads):
            return _state(fsdp1, grads=grads)
    params, found = {}, {}
    for name, p in model.named_parameters():
        params[_clean(name)] = _whole(p)
        if grads:
            found[_clean(name)] = _whole(p.grad)
    return {"params": params, "grads": found if grads else None}


def _train(
    ctx: Ctx,
    model: nn.Module,
    forward: Callable[..., Any],
    loss_of: Callable[[Callable[..., Any], Any], Tensor],
    make: Callable[[torch.Generator], tuple[Tensor, ...]],
    *,
    steps: int = STEPS,
    opt: Any = None,
    fsdp1: nn.Module | None = None,
    grads: bool = True,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> dict:
    """``steps`` SGD steps of ``loss_of(forward, batch)``; the parameters after them and the
    gradients of the last step. ``opt``: the optimizer (default: SGD over ``model``'s
    parameters); ``fsdp1``: the FSDP1 root to gather them from."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=LR)
    last: dict = {}
    for step in range(steps):
        loss = loss_of(forward, ctx.batch(step, make))
        opt.zero_grad()
        backward(loss)
        if step == steps - 1:
            last = _state(model, fsdp1, grads)
        opt.step()
    return {"params": _state(model, fsdp1, grads=False)["params"], "grads": last["grads"]}


# ---------------------------------------------------------------------------------------------
# Models


def _stack(mode: str = "row", *, p: float = 0.5, bn: bool = False, **kw: Any) -> nn.Sequential:
    """Residual blocks between two linears; ``mode`` "mixed" alternates row and batch mode."""
    torch.manual_seed(0)

    def branch() -> nn.Module:
        norm = nn.BatchNorm1d(16) if bn else nn.LayerNorm(16)
        return nn.Sequential(nn.Linear(16, 16), norm, nn.GELU(), nn.Linear(16, 16))

    modes = ["row", "batch"] * 2 if mode == "mixed" else [mode] * 4
    blocks = [Residual(branch(), p=p, mode=m, **kw) for m in modes]
    return nn.Sequential(nn.Linear(8, 16), *blocks, nn.Linear(16, 1))


def _vectors(n: int = 4) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    return lambda g: (torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g))


def _mse(forward: Callable[..., Any], batch: Any) -> Tensor:
    x, y = batch
    return F.mse_loss(forward(x), y)


def _rows_run(model: nn.Module) -> list[list[int]]:
    """[rows the block was given, rows its branch ran on] for each call of each ``Residual`` of
    ``model``, filled in as it trains (forward pre-hooks)."""
    seen: list[list[int]] = []
    for block in model.modules():
        if isinstance(block, Residual):
            block.register_forward_pre_hook(lambda m, a: seen.append([len(a[0]), 0]))
            block.branch.register_forward_pre_hook(lambda m, a: seen[-1].__setitem__(1, len(a[0])))
    return seen


class _CpuSyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm whose statistics are taken over every rank's rows by an all-reduce through
    the default process group, in forward and in backward: two collectives per call, which every
    rank must make. (torch's own, and DDP holding one, take accelerators only.)"""

    def forward(self, x: Tensor) -> Tensor:
        stats = torch.stack([x.sum(0), x.pow(2).sum(0), x.new_full((x.shape[1],), x.shape[0])])
        total, squares, n = _AllReduce.apply(stats)
        mean = total / n
        var = squares / n - mean.pow(2)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean, alpha=m)
            self.running_var.mul_(1 - m).add_(var * n / (n - 1).clamp(min=1), alpha=m)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def _synced(model: nn.Module) -> None:
    """Each BatchNorm of ``model`` becomes a ``_CpuSyncBatchNorm`` holding the same parameters
    and buffers (after DDP is built: DDP refuses SyncBatchNorm on the CPU)."""
    for name, bn in list(model.named_modules()):
        if type(bn) is nn.BatchNorm1d:
            synced = _CpuSyncBatchNorm(bn.num_features)
            synced.weight, synced.bias = bn.weight, bn.bias
            synced.running_mean, synced.running_var = bn.running_mean, bn.running_var
            synced.num_batches_tracked = bn.num_batches_tracked
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, synced)


class _AllReduce(torch.autograd.Function):
    """A sum over the ranks, whose gradient is the sum over the ranks."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _vit(**kw: Any) -> nn.Module:
    timm = importlib.import_module("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, depth=2, drop_path_rate=0.3, num_classes=10, **kw
    )


def _images(n: int) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    return lambda g: (
        torch.randn(n, 3, 32, 32, generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )


def _ce(forward: Callable[..., Any], batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(forward(x), y)


def _tokens(n: int) -> Callable[[torch.Generator], tuple[Tensor, ...]]:
    return lambda g: (torch.randint(3, 128, (n, 8), generator=g),)


def _lm(forward: Callable[..., Any], batch: Any) -> Tensor:
    (ids,) = batch
    return forward(ids, labels=ids).loss


def _ddp(ctx: Ctx, model: nn.Module) -> nn.Module:
    if ctx.reference:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def _shard(ctx: Ctx, model: nn.Module, parts: Iterator[nn.Module]) -> None:
    """FSDP2: ``fully_shard`` each of ``parts``, then the model (nothing for the reference)."""
    if ctx.reference:
        return
    from torch.distributed.fsdp import fully_shard

    for part in parts:
        fully_shard(part)
    fully_shard(model)


# ---------------------------------------------------------------------------------------------
# The cases


def ddp_residual(mode: str, alike: bool) -> Callable[[Ctx], dict]:
    def run(ctx: Ctx) -> dict:
        model = _stack(mode)
        rows = _rows_run(model)
        ctx.seed(alike)
        out = _train(ctx, model, _ddp(ctx, model), _mse, _vectors())
        return {**out, "rows": rows}

    return run


def fsdp2_residual_branch(ctx: Ctx) -> dict:
    """FSDP2 on each Residual's branch, 2 samples per rank at rate 0.5: a rank keeps none of a
    branch's rows at some step."""
    model = _stack("row", strategy="subset")
    _shard(ctx, model, (block.branch for block in model[1:-1]))
    rows = _rows_run(model)
    ctx.seed()
    return {**_train(ctx, model, model, _mse, _vectors(2), steps=4), "rows": rows}


def ddp_vit(checkpointing: bool) -> Callable[[Ctx], dict]:
    def run(ctx: Ctx) -> dict:
        model = _vit()
        accelerate(model, 0.3)
        if checkpointing:
            model.set_grad_checkpointing()
        ctx.seed()
        return _train(ctx, model, _ddp(ctx, model), _ce, _images(4))

    return run


def fsdp2_vit(where: str, order: str) -> Callable[[Ctx], dict]:
    """FSDP2 on each block or on each block's MLP (the branch of its second site). Per branch,
    2 samples per rank at rate 0.5: a rank keeps none of a branch's rows at some step."""

    def run(ctx: Ctx) -> dict:
        model = _vit()
        p, rule, n = (0.3, "model", 4) if where == "block" else (0.5, "uniform", 2)
        parts = (b if where == "block" else b.mlp for b in model.blocks)
        if order == "accelerate, shard":
            accelerate(model, p, rule)
            if where == "branch":  # FSDP's hooks in a block keep it from checking itself
                assert set(check(model, torch.randn(n, 3, 32, 32)).values()) == {"verified"}
            _shard(ctx, model, parts)
        else:
            _shard(ctx, model, parts)
            accelerate(model, p, rule)
        ctx.seed()
        out = _train(ctx, model, model, _ce, _images(n), steps=4)
        return {**out, "states": check_states(model)}

    return run


def fsdp1_vit(orig_params: bool) -> Callable[[Ctx], dict]:
    """FSDP1 on each block: by its auto-wrap policy (original parameters) or by hand (flat
    parameters). 2 samples per rank at rate 0.7: a rank drops a whole block at some step."""

    def run(ctx: Ctx) -> dict:
        model = _vit()
        accelerate(model, 0.7, "uniform")
        root = None
        if not ctx.reference:
            from timm.models.vision_transformer import Block
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            if orig_params:
                policy = ModuleWrapPolicy({Block})
                root = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=CPU)
            else:
                for i, block in enumerate(model.blocks):
                    model.blocks[i] = FSDP(block, use_orig_params=False, device_id=CPU)
                root = FSDP(model, use_orig_params=False, device_id=CPU)
        ctx.seed()
        opt = torch.optim.SGD((root or model).parameters(), lr=LR)
        forward = root or model
        return _train(
            ctx, model, forward, _ce, _images(2), steps=4, opt=opt, fsdp1=root, grads=orig_params
        )

    return run


def fsdp1_residual_flat(ctx: Ctx) -> dict:
    """FSDP1 with flat parameters on each Residual block, 2 samples per rank at rate 0.5: a rank
    drops every row of a block at some step, while the other keeps some."""
    model = _stack("row", strategy="subset")
    rows = _rows_run(model)
    root = None
    if not ctx.reference:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        for i in range(1, 5):
            model[i] = FSDP(model[i], use_orig_params=False, device_id=CPU)
        root = FSDP(model, use_orig_params=False, device_id=CPU)
    ctx.seed()
    opt = torch.optim.SGD((root or model).parameters(), lr=LR)
    out = _train(
        ctx, model, root or model, _mse, _vectors(2), steps=4, opt=opt, fsdp1=root, grads=False
    )
    return {**out, "rows": rows}


def ahead_compiled(wrap: str) -> Callable[[Ctx], dict]:
    """``draw_ahead`` and ``torch.compile`` (eager backend) on an accelerated ViT, under DDP
    (compiling the DDP module) or FSDP2 (per block)."""

    def run(ctx: Ctx) -> dict:
        torch._dynamo.reset()
        model = _vit()
        accelerate(model, 0.3)
        if wrap == "fsdp2":
            _shard(ctx, model, iter(model.blocks))
        draw_ahead(model)
        wrapped = _ddp(ctx, model) if wrap == "ddp" else model
        ctx.seed()
        return _train(ctx, model, torch.compile(wrapped, backend="eager"), _ce, _images(4))

    return run


def layer_dropped(wrap: str) -> Callable[[Ctx], dict]:
    def run(ctx: Ctx) -> dict:
        from real_models import tiny_llama

        model = tiny_llama(layers=4)
        layer_drop(model, 0.5)
        if wrap == "fsdp2":
            _shard(ctx, model, iter(model.model.layers))
            forward: nn.Module = model
        else:
            forward = _ddp(ctx, model)
        ctx.seed()
        return _train(ctx, model, forward, _lm, _tokens(2))

    return run


def sync_batchnorm(ctx: Ctx) -> dict:
    """A branch with SyncBatchNorm in row mode, 2 samples per rank at rate 0.5: a rank keeps
    none of a block's rows at some step while the other keeps some."""
    model = _stack("row", bn=True, strategy="subset")
    wrapped = _ddp(ctx, model)
    _synced(model)
    rows = _rows_run(model)
    ctx.seed()
    out = _train(ctx, model, wrapped, _mse, _vectors(2), steps=4)
    return {**out, "rows": rows}


SCHEDULE = {"time_rule": "warmup", "warmup_steps": 3}


def lightning(strategy: str) -> Callable[[Ctx], dict]:
    """Lightning's Trainer, with droppath's callback, on a stack of row and batch blocks; the
    process group is this case's (Lightning finds it initialized and LOCAL_RANK set: it starts
    no process of its own)."""

    def run(ctx: Ctx) -> dict:
        from droppath.integrations._common import ScheduleAtStep

        model = _stack("mixed")
        rows = _rows_run(model)
        steps = 4
        if ctx.reference:  # the ranks' batches, as Lightning's sampler handed them out
            schedule = ScheduleAtStep(0.5, **SCHEDULE)
            schedule.start(model)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            for step in range(steps):
                schedule.at(step)
                batch = _cat([r["inputs"][step] for r in ctx.ranks])
                opt.zero_grad()
                _mse(model, batch).backward()
                opt.step()
            return {**_state(model, grads=False), "rows": rows}
        return {**_fit_lightning(ctx, model, strategy, steps), "rows": rows}

    return run


def _fit_lightning(ctx: Ctx, net: nn.Module, strategy: str, steps: int) -> dict:
    import lightning.pytorch as pl

    from droppath.integrations.lightning import DropRateCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            ctx.inputs.append(tuple(t.detach().clone() for t in batch))
            return _mse(self.net, batch)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=LR)

        def train_dataloader(self) -> Any:
            data = torch.utils.data.TensorDataset(*_vectors(64)(torch.Generator().manual_seed(5)))
            return torch.utils.data.DataLoader(data, batch_size=4)

    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        chosen: Any = DDPStrategy(process_group_backend="gloo")
    else:
        chosen = _cpu_fsdp_strategy()(process_group_backend="gloo", auto_wrap_policy={Residual})
    module = Module()
    ctx.seed()
    trainer = pl.Trainer(
        max_steps=steps,
        strategy=chosen,
        accelerator="cpu",
        devices=2,
        num_nodes=1,
        callbacks=[DropRateCallback(0.5, **SCHEDULE)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    ctx.kept.append(trainer)
    assert trainer.world_size == 2 and trainer.global_step == steps
    state = _state(net) if strategy == "ddp" else _state(net, trainer.strategy.model, grads=False)
    params = {k.removeprefix("net."): v for k, v in state["params"].items()}  # the module's
    return {"params": params, "grads": None}


def _cpu_fsdp_strategy() -> type:
    """Lightning's FSDP strategy on the CPU, which Lightning refuses: it checks for a GPU
    accelerator on the exact class (a subclass passes), and wraps with FSDP1 without the
    ``device_id`` FSDP1 needs on the CPU (here the model comes wrapped, which Lightning keeps)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    class CpuFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: nn.Module) -> nn.Module:
            return super()._setup_model(FSDP(model, device_id=CPU, **self.kwargs))

    return CpuFSDPStrategy


def hf_accelerate(ctx: Ctx) -> dict:
    """Hugging Face accelerate's Accelerator (CPU, the case's process group: DDP) on a stack of
    row and batch blocks."""
    model = _stack("mixed")
    rows = _rows_run(model)
    ctx.seed()
    if ctx.reference:
        return {**_train(ctx, model, model, _mse, _vectors()), "rows": rows}
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.state
    wrapped, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    ctx.kept.append(acc)
    assert type(wrapped).__name__ == "DistributedDataParallel", type(wrapped)
    out = _train(ctx, model, wrapped, _mse, _vectors(), opt=opt, backward=acc.backward)
    return {**out, "rows": rows}


def deepspeed_zero3(ctx: Ctx) -> dict:
    """DeepSpeed's ZeRO stage 3 (parameters partitioned, gathered by hooks around each module)
    on a stack of row and batch blocks."""
    model = _stack("mixed")
    rows = _rows_run(model)
    ctx.seed()
    if ctx.reference:
        return {**_train(ctx, model, model, _mse, _vectors()), "rows": rows}
    import deepspeed
    import deepspeed.comm.torch

    # the shared-memory all-reduce DeepSpeed compiles for CPUs on first use (a minute), which
    # training over gloo does not need
    deepspeed.comm.torch.build_shm_op = lambda: None
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    ctx.kept.append(engine)
    last = {}
    for step in range(STEPS):
        loss = _mse(engine, ctx.batch(step, _vectors()))
        engine.backward(loss)
        if step == STEPS - 1:
            last = {n: deepspeed.utils.safe_get_full_grad(p) for n, p in model.named_parameters()}
        engine.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "grads": last, "rows": rows}


# ---------------------------------------------------------------------------------------------
# What each case must show besides agreeing with the reference


def _kept(records: list[Record]) -> list[Tensor]:
    return [value for kind, _, value in records if kind == "kept"]


def _one_rank_keeps_no_row(r0: dict, r1: dict) -> None:
    """At some draw, one rank keeps none of its rows while the other keeps some."""
    pairs = zip(_kept(r0["draws"]), _kept(r1["draws"]), strict=True)
    found = [i for i, (a, b) in enumerate(pairs) if bool(a.any()) != bool(b.any())]
    assert found, "no rank kept none of a branch's rows alone: the case does not test that"


def _one_rank_drops_a_block(r0: dict, r1: dict) -> None:
    """At some step, one rank keeps no row at both sites of a block (draws 2i and 2i + 1:
    every site has a rate above 0) while the other keeps some."""
    pairs = list(zip(_kept(r0["draws"]), _kept(r1["draws"]), strict=True))
    found = [
        i
        for i in range(0, len(pairs) - 1, 2)
        if len({bool(pairs[i][r].any() or pairs[i + 1][r].any()) for r in range(2)}) == 2
    ]
    assert found, "no rank dropped a whole block alone: the case does not test that"


def _blocks_stay_unchecked(r0: dict, r1: dict) -> None:
    for r in (r0, r1):
        assert set(r["states"].values()) == {"pending"}, r["states"]


def _skips_and_gates_agree(r0: dict, r1: dict) -> None:
    for r in (r0, r1):
        given = sum(n for n, _ in r["rows"])
        run = sum(k for _, k in r["rows"])
        assert run < given, f"no branch skipped a row: {run} of {given} rows run"
    gates = [[v for kind, _, v in r["draws"] if kind == "gate"] for r in (r0, r1)]
    assert gates[0], "no batch-mode gate was drawn"
    assert gates[0] == gates[1], f"batch-mode gates differ across ranks: {gates}"


@dataclass(frozen=True)
class Case:
    run: Callable[[Ctx], dict]
    reference: bool = True  # compared with the single-process reference
    checks: tuple[Callable[[dict, dict], None], ...] = ()
    optional: tuple[str, ...] = ()  # libraries it needs that CI does not install


CASES: dict[str, Case] = {
    "ddp-residual-row-seeded-alike": Case(ddp_residual("row", alike=True)),
    "ddp-residual-batch-seeded-per-rank": Case(ddp_residual("batch", alike=False)),
    "ddp-vit": Case(ddp_vit(checkpointing=False)),
    "ddp-vit-checkpointing": Case(ddp_vit(checkpointing=True)),
    "fsdp2-block-accelerate-then-shard": Case(fsdp2_vit("block", "accelerate, shard")),
    "fsdp2-block-shard-then-accelerate": Case(fsdp2_vit("block", "shard, accelerate")),
    "fsdp2-residual-branch": Case(fsdp2_residual_branch, checks=(_one_rank_keeps_no_row,)),
    "fsdp2-branch-accelerate-then-shard": Case(
        fsdp2_vit("branch", "accelerate, shard"), checks=(_one_rank_keeps_no_row,)
    ),
    # sharded first, a block cannot check itself inside the step (FSDP's hooks in its branch):
    # it runs its own forward, the mask drawn on the device (no reference replays that), and
    # says so; the ranks must agree
    "fsdp2-branch-shard-then-accelerate": Case(
        fsdp2_vit("branch", "shard, accelerate"), reference=False, checks=(_blocks_stay_unchecked,)
    ),
    "fsdp1-orig-params-auto-wrap": Case(fsdp1_vit(True), checks=(_one_rank_drops_a_block,)),
    "fsdp1-flat-params-manual-wrap": Case(fsdp1_vit(False), checks=(_one_rank_drops_a_block,)),
    "fsdp1-flat-params-residual": Case(fsdp1_residual_flat, checks=(_one_rank_keeps_no_row,)),
    "ddp-draw-ahead-compile": Case(ahead_compiled("ddp")),
    "fsdp2-draw-ahead-compile": Case(ahead_compiled("fsdp2")),
    "ddp-layer-drop-llama": Case(layer_dropped("ddp")),
    "fsdp2-layer-drop-llama": Case(layer_dropped("fsdp2")),
    # the ranks' batch statistics include the fillers a rank runs (weighted 0) where it keeps
    # fewer than 2 rows, the reference's do not: no reference, the ranks must agree
    "ddp-syncbatchnorm-row": Case(
        sync_batchnorm, reference=False, checks=(_one_rank_keeps_no_row,)
    ),
    "lightning-ddp": Case(lightning("ddp"), checks=(_skips_and_gates_agree,)),
    "lightning-fsdp": Case(lightning("fsdp"), checks=(_skips_and_gates_agree,)),
    "hf-accelerate-ddp": Case(hf_accelerate, checks=(_skips_and_gates_agree,)),
    # DeepSpeed is in the real extra (CI installs it); elsewhere this case skips without it.
    # DeepSpeed's own optimizer step differs from the reference's at rate 0 too (0.05 after 3
    # steps: its SGD, not droppath), so no reference; the ranks must agree, skip alike, and
    # neither hang nor abort (they did: a rank skipped a branch whose ZeRO-3 parameters the
    # other gathered, and the skipped parameters' zero gradients had the partition's shape)
    "deepspeed-zero3": Case(
        deepspeed_zero3,
        reference=False,
        checks=(_skips_and_gates_agree,),
        optional=("deepspeed",),
    ),
}


# ---------------------------------------------------------------------------------------------
# The pair of processes


def _path(out: str, name: str, who: str) -> str:
    return os.path.join(out, f"{name}.{who}.pt")


def _stderr(out: str, rank: int) -> str:
    return os.path.join(out, f"rank{rank}.stderr")


def _together(store: Any, key: str, rank: int, limit: float) -> None:
    """Wait until both ranks are at ``key`` (through the store, not the process group)."""
    store.set(f"{key}/{rank}", "1")
    store.wait([f"{key}/{1 - rank}"], datetime.timedelta(seconds=limit))


def _worker(rank: int, world: int, port: int, names: list[str], out: str, progress: Progress):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # stderr to a file: what a rank that dies says before it does (gloo aborts the process on a
    # collective mismatch) goes into the failure of its case
    os.dup2(os.open(_stderr(out, rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
    # what launchers set: Lightning and accelerate find the process group, start none
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        NODE_RANK="0",
    )
    store = dist.TCPStore(
        "127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=CASE_LIMIT)
    )
    for name in names:
        if os.path.exists(_path(out, name, "rank0")) and os.path.exists(_path(out, name, "rank1")):
            store.set(f"done/{name}/{rank}", "1")  # run before the pair was started again
            continue
        # noted once both ranks are here: a rank that waits for the other, still at its case,
        # stays on that case's note
        _together(store, f"start/{name}", rank, CASE_LIMIT)
        progress.note(rank, f"case {name}", CASE_LIMIT)
        ctx, start = Ctx(rank, world), time.perf_counter()
        _KEEP.append(ctx)  # never freed: gloo's teardown can deadlock (tests/test_residual.py)
        result: dict[str, Any] = {}
        try:
            init_gloo(rank, world, port, store=dist.PrefixStore(f"case/{name}/", store))
            with recording() as draws:
                result = CASES[name].run(ctx)
            result["draws"] = draws
            result["inputs"] = ctx.inputs
        except BaseException:
            result = {"error": traceback.format_exc()}
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        result["seconds"] = time.perf_counter() - start
        torch.save(result, _path(out, name, f"rank{rank}"))
        store.set(f"done/{name}/{rank}", "1")
    # the references, half in each rank, with no process group
    for i, name in enumerate(names):
        if i % world != rank or not CASES[name].reference:
            continue
        if os.path.exists(_path(out, name, "reference")):
            continue
        progress.note(rank, f"the reference of {name}", CASE_LIMIT)
        store.wait([f"done/{name}/{1 - rank}"], datetime.timedelta(seconds=CASE_LIMIT))
        torch.save(_reference(name, out), _path(out, name, "reference"))
    progress.note(rank, "the end", CASE_LIMIT)
    store.set(f"end/{rank}", "1")
    if rank == 0:  # the store's host leaves last
        store.wait(["end/1"], datetime.timedelta(seconds=CASE_LIMIT))
    os._exit(0)  # see tests/test_residual.py: gloo's destructors can deadlock at teardown


_KEEP: list[Any] = []


def _finished(out: str, name: str) -> bool:
    """Whether the pair has saved every result of case ``name``."""
    whose = ["rank0", "rank1"] + (["reference"] if CASES[name].reference else [])
    return all(os.path.exists(_path(out, name, who)) for who in whose)


def _reference(name: str, out: str) -> dict:
    ranks = [torch.load(_path(out, name, f"rank{r}"), weights_only=True) for r in range(2)]
    if any("error" in r for r in ranks):
        return {"error": "no reference: a rank failed"}
    start = time.perf_counter()
    try:
        with replaying([r["draws"] for r in ranks]) as replay:
            result = CASES[name].run(Ctx(None, ranks=ranks))
        assert replay.left() == [0, 0], f"the reference left draws unused: {replay.left()}"
    except BaseException:
        return {"error": traceback.format_exc()}
    result.pop("rows", None)
    return {**result, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# The tests


def _installed(name: str) -> bool:
    return all(importlib.util.find_spec(lib) is not None for lib in CASES[name].optional)


class Matrix:
    """The results of the pair's run: a rank's, the reference's, or why there are none."""

    def __init__(self, out: Path, lost: dict[str, str], seconds: float) -> None:
        self.out, self.lost, self.seconds = out, lost, seconds

    def load(self, name: str, who: str) -> dict:
        for library in CASES[name].optional:
            require(library)  # in CI (the real extra installs it) a failure, elsewhere a skip
        if name in self.lost:
            pytest.fail(self.lost[name], pytrace=False)
        path = Path(_path(str(self.out), name, who))
        if not path.exists():
            pytest.fail(f"{name}: no result from {who} (cases lost: {sorted(self.lost)})")
        result = torch.load(path, weights_only=True)
        if "error" in result:
            pytest.fail(f"{name} failed in {who}:\n{result['error']}", pytrace=False)
        return result

    def ranks(self, name: str) -> tuple[dict, dict]:
        failed = []
        for rank in range(2):
            try:
                self.load(name, f"rank{rank}")
            except pytest.fail.Exception as failure:
                failed.append(str(failure))
        if failed:
            pytest.fail("\n".join(failed), pytrace=False)
        return self.load(name, "rank0"), self.load(name, "rank1")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    """The pair's results, run once per pytest run: under pytest-xdist, the first worker to
    get here runs the pair and the others wait for it and read its results."""
    import fcntl
    import json

    for library in ("timm", "transformers", "lightning", "accelerate"):
        require(library)  # here, not in the ranks, where a skip would be a failure
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's, above each worker's
    out = shared / "distributed-matrix"
    with open(shared / "distributed-matrix.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "summary.json").exists():
            out.mkdir(exist_ok=True)
            lost, seconds = _run_matrix(out)
            (out / "summary.json").write_text(json.dumps({"lost": lost, "seconds": seconds}))
            print(f"the distributed matrix took {seconds:.0f} s")
        summary = json.loads((out / "summary.json").read_text())
    return Matrix(out, summary["lost"], summary["seconds"])


def _run_matrix(out: Path) -> tuple[dict[str, str], float]:
    """Run every installed case in a pair of processes, and start the pair again after a case
    that hung or killed a rank; what was lost so, and the seconds it all took."""
    names = [n for n in CASES if _installed(n)]
    lost: dict[str, str] = {}  # the cases whose pair was killed or died, and why
    start = time.perf_counter()
    for attempt in range(len(names)):
        progress = Progress(out / f"progress{attempt}")
        todo = [n for n in names if n not in lost]
        said = [_size(_stderr(str(out), r)) for r in range(2)]
        try:
            run_two_processes(
                _worker, (todo, str(out), progress), timeout=STARTUP_LIMIT, progress=progress
            )
            break
        except pytest.fail.Exception as failure:  # the watchdog, or a rank died: go on
            notes = [progress.last(r) for r in range(2)]
            stuck = {n[2].split(" ")[-1] for n in notes if n is not None} & set(CASES)
            if not stuck:  # not in a case: whatever has no result
                stuck = {n for n in todo if not _finished(str(out), n)}
            tails = "".join(_tail(_stderr(str(out), r), said[r], r) for r in range(2))
            lost.update((n, f"{n} did not finish: {failure}{tails}") for n in stuck)
    return lost, time.perf_counter() - start


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def _tail(path: str, start: int, rank: int, lines: int = 12) -> str:
    """The last lines rank ``rank`` wrote to stderr after offset ``start``."""
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        f.seek(start)
        said = f.read().splitlines()[-lines:]
    return f"\nrank {rank}'s stderr, last lines:\n" + "\n".join(said) if said else ""


def _assert_ranks_equal(r0: dict, r1: dict) -> None:
    assert r0["params"].keys() == r1["params"].keys()
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), f"{key} differs between the ranks"


def _close(what: str, got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), f"{what}: other parameters than the reference's"
    for key, value in want.items():
        zeros = torch.zeros_like(value if value is not None else got[key])
        torch.testing.assert_close(
            got[key] if got[key] is not None else zeros,
            value if value is not None else zeros,
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, key=key: f"{what} of {key} differs from the reference's: {m}",
        )


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.reference])
def test_matches_the_single_process_reference(matrix: Matrix, name: str) -> None:
    r0, r1 = matrix.ranks(name)
    _assert_ranks_equal(r0, r1)
    reference = matrix.load(name, "reference")
    for rank, r in enumerate((r0, r1)):
        _close(f"rank {rank}: the parameter", r["params"], reference["params"])
        if r["grads"] is not None:
            _close(f"rank {rank}: the last gradient", r["grads"], reference["grads"])
    for shows in CASES[name].checks:
        shows(r0, r1)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.reference])
def test_runs_and_the_ranks_agree(matrix: Matrix, name: str) -> None:
    r0, r1 = matrix.ranks(name)
    _assert_ranks_equal(r0, r1)
    for shows in CASES[name].checks:
        shows(r0, r1)


def test_row_decisions_differ_across_ranks_seeded_alike(matrix: Matrix) -> None:
    # every rank seeded alike, as the docs said: the samples of the global batch must still be
    # dropped independently (tests/test_distributed.py tests it statistically)
    r0, r1 = matrix.ranks("ddp-residual-row-seeded-alike")
    pairs = list(zip(_kept(r0["draws"]), _kept(r1["draws"]), strict=True))
    assert len(pairs) >= 8
    same = sum(torch.equal(a, b) for a, b in pairs)
    assert same < len(pairs), f"the ranks kept the same rows in all {same} draws"


def test_batch_gates_agree_across_ranks_seeded_per_rank(matrix: Matrix) -> None:
    r0, r1 = matrix.ranks("ddp-residual-batch-seeded-per-rank")
    gates = [[v for kind, _, v in r["draws"] if kind == "gate"] for r in (r0, r1)]
    assert len(gates[0]) == 4 * STEPS
    assert gates[0] == gates[1], f"batch-mode gates differ across ranks: {gates}"
