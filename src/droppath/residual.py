"""Residual connections that skip the dropped work: ``Residual``, ``drop_add_residual``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from droppath._checks import (
    STRATEGIES,
    check_bucket,
    check_choice,
    check_drop_args,
    check_input,
)
from droppath._fx import function_node, is_proxy, module_node, module_reference
from droppath.drop import _DropBase, drop_path, keep_mask

__all__ = ["Residual", "drop_add_residual"]

Branch = Callable[[Tensor], Tensor]
_F = TypeVar("_F", bound=Callable[..., Any])


def _eager(fn: _F) -> _F:
    """Run ``fn`` and everything it calls eagerly under torch.compile: host-side draws and the
    small index operations around them, whose data-dependent sizes would break a graph anyway."""
    return cast(_F, torch.compiler.disable(fn))  # type: ignore[no-untyped-call]


def _host_side(fn: _F) -> _F:
    """Run ``fn``'s own code eagerly under torch.compile; what it calls still compiles.

    ``fn`` makes host-side decisions (random draws, what to run) whose values must not become
    constants of a graph; the modules it calls (a branch, a shortcut) are compiled by dynamo as
    frames of their own. One graph break at each call of ``fn``.
    """
    return cast(_F, torch.compiler.disable(fn, recursive=False))  # type: ignore[no-untyped-call]


def _host_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """The generator for decisions made on the host: ``generator`` if it lives on the CPU."""
    if generator is not None and generator.device.type == "cpu":
        return generator
    return None


@_eager
def _draw_gate(keep: float, generator: torch.Generator | None) -> bool:
    """One Bernoulli(keep) decision for batch mode, drawn on the host.

    The draw uses the CPU generator (the global one unless ``generator`` is a CPU generator), so it
    never waits for an accelerator, agrees across processes seeded alike (no collective), and is
    replayed by ``torch.utils.checkpoint``, which restores the CPU random state for recomputation.
    """
    return bool(torch.rand((), generator=_host_generator(generator)) < keep)


@_eager
def _draw_rows(
    n: int, keep: float, device: torch.device, generator: torch.Generator | None, bucket: int | None
) -> tuple[Tensor, Tensor]:
    """The kept samples: an independent Bernoulli(keep) draw per sample, on the host.

    Independent draws make every sample's keep probability exactly ``keep`` at every batch size
    (a fixed subset size ``round(n * keep)`` would not). The count of kept samples is known on the
    host before the branch runs, so choosing what to run needs no device synchronization.

    Returns the indices of the kept samples, and those of the samples to run: the kept ones,
    followed, with ``bucket``, by as many dropped ones as it takes to make their count a multiple
    of ``bucket`` (or ``n``), and by one dropped sample when only one is kept: the branch never
    sees a batch of one, which BatchNorm rejects in training and torch.compile specializes.
    """
    kept = torch.rand(n, generator=_host_generator(generator)) < keep
    idx = kept.nonzero().squeeze(1)
    run = idx
    k = idx.shape[0]
    if 0 < k < n:
        size = max(2, k if bucket is None else min(n, -(-k // bucket) * bucket))
        if size > k:
            run = torch.cat([idx, (~kept).nonzero().squeeze(1)[: size - k]])
    if device.type == "cpu":
        return idx, run
    both = torch.cat([idx, run])
    if device.type == "cuda":
        both = both.pin_memory()
    both = both.to(device, non_blocking=True)
    return both[:k], both[k:]


class _TouchParams(torch.autograd.Function):
    """Identity on ``x`` that gives zero gradients to ``params``.

    When a dropped branch is skipped in a distributed run, its parameters still receive a gradient
    (zeros), so ``DistributedDataParallel`` with its default ``find_unused_parameters=False`` finds
    every parameter ready and neither raises nor hangs.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, *params: Tensor) -> Tensor:
        ctx.param_meta = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.param_meta]
        return (grad, *zeros)


class _ScatterAdd(torch.autograd.Function):
    """``base`` with ``alpha * rows`` added at ``idx`` along ``dim``, saving only ``idx``.

    ``Tensor.index_add`` keeps its whole ``source`` alive for backward (to shape its gradient),
    which would hold on to the branch output of every kept row; this only needs the indices.
    ``clone()`` keeps ``base``'s memory format (channels_last), which ``index_add`` would not.
    """

    @staticmethod
    def forward(
        ctx: Any,
        base: Tensor,
        rows: Tensor,
        idx: Tensor,
        dim: int,
        alpha: float,
        memory_format: torch.memory_format = torch.preserve_format,
    ) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.dim, ctx.alpha = dim, alpha
        return base.clone(memory_format=memory_format).index_add_(dim, idx, rows, alpha=alpha)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (idx,) = ctx.saved_tensors
        grad_rows = None
        if ctx.needs_input_grad[1]:
            grad_rows = _rows(grad, idx, ctx.dim)
            if ctx.alpha != 1.0:
                grad_rows.mul_(ctx.alpha)  # a fresh tensor: scaled in place
        return grad, grad_rows, None, None, None, None


class _Split(torch.autograd.Function):
    """``(x, x[idx])``: the input for the shortcut path and the kept rows for the branch.

    One node for both uses of ``x``, so that backward adds the kept rows' gradient into the
    shortcut's gradient directly, instead of scattering it into a zero tensor of ``x``'s size
    and then adding two full-size gradients.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, idx: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(idx)
        ctx.dim, ctx.n = dim, x.shape[dim]
        return x.view_as(x), _rows(x, idx, dim)

    @staticmethod
    def backward(
        ctx: Any, grad_x: Tensor | None, grad_rows: Tensor | None
    ) -> tuple[Tensor | None, None, None]:
        (idx,) = ctx.saved_tensors
        if grad_rows is None:
            return grad_x, None, None
        if grad_x is None:
            shape = list(grad_rows.shape)
            shape[ctx.dim] = ctx.n
            grad_x = grad_rows.new_zeros(shape)
        else:
            grad_x = grad_x.clone()  # may be shared with other nodes: never written in place
        return grad_x.index_add_(ctx.dim, idx, grad_rows), None, None


def _needs_touch() -> bool:
    return (
        torch.is_grad_enabled()
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


@_eager
def _skip(base: Tensor, branch: Branch) -> Tensor:
    """A step whose branch is dropped for every sample: ``base``, the branch never called.

    Under DDP, the parameters of ``branch`` (a module, or any callable with ``parameters()``)
    receive zero gradients."""
    parameters = getattr(branch, "parameters", None)
    if callable(parameters) and _needs_touch():
        params = [p for p in parameters() if p.requires_grad]
        if params:
            out: Tensor = _TouchParams.apply(base, *params)  # type: ignore[no-untyped-call]
            return out
    return base


def _common(base: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """Cast both terms of the sum to their promoted dtype, as ``base + out`` would (autocast)."""
    if base.dtype == out.dtype:
        return base, out
    dtype = torch.promote_types(base.dtype, out.dtype)
    return base.to(dtype), out.to(dtype)


def _check_rows(out: Tensor, base: Tensor, dim: int, k: int) -> None:
    """The branch's output on ``k`` kept rows must fit ``base`` at those rows."""
    expected = (*base.shape[:dim], k, *base.shape[dim + 1 :])
    if out.shape != expected:
        raise ValueError(
            f"branch output must have the shape of the shortcut path except along batch_dim "
            f"(dim {dim}): for {k} kept rows of a shortcut of shape {tuple(base.shape)} expected "
            f"{expected}, got {tuple(out.shape)}"
        )


def _is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is laid out channels_last and not also contiguous (a 4-D NHWC layout)."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _rows(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """``x.index_select(dim, idx)`` in ``x``'s memory format: a channels_last ``x`` gives
    channels_last rows (``index_select`` alone would return them contiguous), in one copy."""
    if not _is_channels_last(x):
        return x.index_select(dim, idx)
    if dim == 0:  # gather whole NHWC rows, then view them as NCHW again
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return x.index_select(dim, idx).contiguous(memory_format=torch.channels_last)


def drop_add_residual(
    x: Tensor,
    branch: Branch,
    p: float = 0.0,
    training: bool = True,
    *,
    shortcut: Branch | None = None,
    mode: str = "row",
    batch_dim: int = 0,
    scale_by_keep: bool = True,
    strategy: str = "auto",
    bucket: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Compute ``base + drop_path(branch(x))`` without computing what is dropped.

    Stochastic depth as in Huang et al., "Deep Networks with Stochastic Depth" (ECCV 2016), whose
    code skipped dropped blocks; ``base`` is ``shortcut(x)`` when a shortcut is given, else ``x``.
    The result has the distribution of ``base + drop_path(branch(x), p, mode=mode, ...)``, but:

    - ``mode="batch"``: a dropped step never calls ``branch`` (no forward, no backward).
    - ``mode="row"``, ``strategy="subset"``: ``branch`` runs only on the kept samples, gathered
      along ``batch_dim``, and its output is added back at their rows, scaled by ``1 / (1 - p)``.
      Each sample is kept independently with probability exactly ``1 - p``, at every batch size.
      When one sample alone is kept, a dropped one runs beside it (its output discarded), so the
      branch never sees a batch of one (BatchNorm rejects it; torch.compile specializes it).
    - ``mode="row"``, ``strategy="mask"``: ``branch`` runs on every sample and the drop is fused
      into the add (``torch.addcmul``), as timm and torchvision do, without their extra temporary.
    - ``mode="row"``, ``strategy="auto"``: draws the kept samples first, then skips the branch when
      none is kept, runs it plainly when all are, and runs it on the subset otherwise.

    Branches that mix samples (BatchNorm in training mode) see only the kept samples under
    ``"subset"`` and ``"auto"``: their batch statistics are those of the kept samples, as if the
    batch were smaller. Use ``strategy="mask"`` to keep statistics over the whole batch.

    Random decisions are drawn on the host from the CPU generator (``generator`` when it is a CPU
    generator, else the global one): no device synchronization, identical decisions in processes
    seeded alike, and exact replay under ``torch.utils.checkpoint``. ``strategy="mask"`` draws its
    mask on ``x``'s device instead (with ``generator`` when it lives there).

    Args:
        x: the input, of any floating dtype and rank >= 1.
        branch: the residual branch, a callable (usually a module) from ``x`` to a tensor whose
            shape is ``base``'s.
        p: the probability of dropping the branch, per sample or per step, in [0, 1]. Default: 0.0.
        training: apply stochastic depth only when True; otherwise return ``base + branch(x)``.
            Default: True.
        shortcut: a callable applied to ``x`` for the identity path, e.g. a projection when the
            branch changes the shape. Default: None (the identity).
        mode: ``"row"`` (one decision per sample) or ``"batch"`` (one per call). Default: ``"row"``.
        batch_dim: the dimension that indexes samples, e.g. 1 for ``(L, N, E)``. Default: 0.
        scale_by_keep: multiply the kept branch output by ``1 / (1 - p)``. Default: True.
        strategy: ``"auto"``, ``"subset"`` or ``"mask"``, how row mode spends compute (above).
            Ignored in batch mode. Default: ``"auto"``.
        bucket: row mode's subset: round the number of rows the branch runs on up to a multiple
            of ``bucket`` (or the batch size) by adding dropped rows, whose outputs are
            discarded. The draws and the result are unchanged for branches that treat samples
            independently; the branch sees at most ``ceil(n / bucket)`` batch sizes, which
            CUDA graphs (``torch.compile(mode="reduce-overhead")``) need. Default: None.
        generator: the random generator for the decisions. Default: None (the global ones).

    Shape:
        - Input: :math:`(*)`, with the batch at ``batch_dim``.
        - Output: the shape of ``base``, which the branch's output must match.

    Examples:
        >>> import torch
        >>> from droppath import drop_add_residual
        >>> calls = []
        >>> def branch(t):
        ...     calls.append(t.shape[0])
        ...     return 2 * t
        >>> x = torch.ones(8, 3)
        >>> y = drop_add_residual(x, branch, p=0.5, generator=torch.Generator().manual_seed(0))
        >>> calls[-1] < 8  # the branch saw only the kept rows
        True
        >>> sorted(set(y[:, 0].tolist()))  # dropped rows are x, kept rows x + 2 * x / (1 - p)
        [1.0, 5.0]
        >>> torch.equal(drop_add_residual(x, branch, p=0.5, training=False), 3 * x)
        True
    """
    if is_proxy(x):  # torch.fx: one node, see droppath._fx
        node: Tensor = _fx_node(
            x, branch, p, training, shortcut, mode, batch_dim, scale_by_keep, strategy, bucket
        )
        return node
    if training and not (mode == "row" and strategy == "mask"):
        # Decided on the host: the rate never enters a torch.compile graph (see _host_side).
        return _skipping_add(
            x, branch, p, shortcut, mode, batch_dim, scale_by_keep, strategy, bucket, generator
        )
    dim, p = _check_args(x, branch, p, shortcut, mode, batch_dim, scale_by_keep, strategy, bucket)
    if not training or p == 0.0:
        return _shortcut_of(x, shortcut) + branch(x)
    if p == 1.0:
        return _skip(_shortcut_of(x, shortcut), branch)
    base, out = _common(_shortcut_of(x, shortcut), branch(x))
    out_dim = dim if out.dim() == x.dim() else batch_dim % out.dim()
    device_gen = generator if generator is not None and generator.device == out.device else None
    mask = keep_mask(
        out, p, mode="row", batch_dim=out_dim, scale_by_keep=scale_by_keep, generator=device_gen
    )
    return torch.addcmul(base, out, mask)


def _fx_node(
    x: Any,
    branch: Branch,
    p: float,
    training: Any,
    shortcut: Branch | None,
    mode: str,
    batch_dim: int,
    scale_by_keep: bool,
    strategy: str,
    bucket: int | None,
) -> Any:
    """``drop_add_residual`` on a ``torch.fx`` proxy: one node when the branch (and shortcut) are
    submodules of the traced model, else the traced branch followed by ``drop_path``."""
    branch_ref = module_reference(x, branch) if isinstance(branch, nn.Module) else None
    shortcut_ref = module_reference(x, shortcut) if isinstance(shortcut, nn.Module) else None
    if branch_ref is not None and (shortcut is None or shortcut_ref is not None):
        return function_node(
            drop_add_residual,
            x,
            branch_ref,
            p,
            training,
            shortcut=shortcut_ref,
            mode=mode,
            batch_dim=batch_dim,
            scale_by_keep=scale_by_keep,
            strategy=strategy,
            bucket=bucket,
        )
    drop = drop_path(
        branch(x), p, training, mode=mode, batch_dim=batch_dim, scale_by_keep=scale_by_keep
    )
    return _shortcut_of(x, shortcut) + drop


def _check_args(
    x: Any,
    branch: Any,
    p: Any,
    shortcut: Any,
    mode: Any,
    batch_dim: Any,
    scale_by_keep: Any,
    strategy: Any,
    bucket: Any,
) -> tuple[int, float]:
    """Check the arguments of ``drop_add_residual``; return ``batch_dim`` made non-negative and
    ``p`` as a float."""
    dim = check_input(x, batch_dim)
    p = check_drop_args(p, mode, scale_by_keep)
    check_choice(strategy, "strategy", STRATEGIES)
    check_bucket(bucket)
    if not callable(branch):
        raise TypeError(f"branch must be callable, got {type(branch).__name__}")
    if shortcut is not None and not callable(shortcut):
        raise TypeError(f"shortcut must be callable or None, got {type(shortcut).__name__}")
    return dim, p


# Called from the host-side step, whose callees would otherwise compile (and guard on p).
_check_args_on_host = _eager(_check_args)


def _shortcut_of(x: Tensor, shortcut: Branch | None) -> Tensor:
    return x if shortcut is None else shortcut(x)


@_host_side
def _skipping_add(
    x: Tensor,
    branch: Branch,
    p: float,
    shortcut: Branch | None,
    mode: str,
    batch_dim: int,
    scale_by_keep: bool,
    strategy: str,
    bucket: int | None,
    generator: torch.Generator | None,
    branch_layout: bool = False,
) -> Tensor:
    """Training step of batch mode and of row mode's ``subset`` and ``auto``: draw, then run the
    branch on what is kept. ``branch_layout``: the sum takes the branch output's memory format
    (see ``_result_format``).

    Under torch.compile this frame runs eagerly, so the rate and the draws never enter a graph (no
    guard on ``p``, no recompilation when a schedule changes it), while ``branch`` and
    ``shortcut`` compile, through ``_run``, as graphs of their own, with the batch dimension
    dynamic from the first call: the full batch and every subset size share one graph.
    """
    dim, p = _check_args_on_host(
        x, branch, p, shortcut, mode, batch_dim, scale_by_keep, strategy, bucket
    )
    keep = 1.0 - p
    if keep == 0.0:
        return _skip(_run(shortcut, x, dim), branch)
    scale = 1.0 / keep if scale_by_keep else 1.0
    if mode == "batch" and not _draw_gate(keep, generator):
        return _skip(_run(shortcut, x, dim), branch)
    if mode == "batch" or p == 0.0:
        return _add(_run(shortcut, x, dim), _run(branch, x, dim), scale, branch_layout)

    n = x.shape[dim]
    idx, run = _draw_rows(n, keep, x.device, generator, bucket)
    k = idx.shape[0]
    if k == 0:
        return _skip(_run(shortcut, x, dim), branch)
    if k == n:
        return _add(_run(shortcut, x, dim), _run(branch, x, dim), scale, branch_layout)
    # one node hands x to the shortcut path and the rows to run to the branch
    x_all, rows = _split(x, run, dim)
    at_rows = getattr(branch, "at_rows", None)
    if at_rows is not None:  # a derived branch, whose per-sample side inputs are gathered too
        branch = at_rows(run, dim)
    base, out = _run(shortcut, x_all, dim), _run(branch, rows, dim)
    return _scatter_add(base, out, idx, dim, scale, branch_layout)


@_host_side
def _run(fn: Branch | None, x: Tensor, dim: int) -> Tensor:
    """``fn(x)`` (``x`` if ``fn`` is None), called from the host-side step.

    The batch dimension is marked dynamic first, so that under torch.compile every batch size
    reuses one graph; then ``_compiled_call`` compiles as a frame of its own, with ``fn`` inlined.
    """
    if fn is None:
        return x
    x = x.view_as(x)  # mark an alias, never the caller's tensor
    torch._dynamo.maybe_mark_dynamic(x, dim)
    return _compiled_call(fn, x)


def _compiled_call(fn: Branch, x: Tensor) -> Tensor:
    """Under torch.compile, one graph: ``fn`` inlined. A module's own ``forward`` would not start
    a frame of its own, since dynamo skips torch's code (``nn.Sequential`` included)."""
    return fn(x)


@_eager
def _add(base: Tensor, out: Tensor, scale: float, branch_layout: bool = False) -> Tensor:
    base, out = _common(base, out)
    if _result_format(out, branch_layout) == torch.channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    return torch.add(base, out, alpha=scale)


def _result_format(out: Tensor, branch_layout: bool) -> torch.memory_format:
    """The memory format of the sum: ``base``'s, or with ``branch_layout`` the branch output's
    when it is channels_last (as ``branch + base`` gives, e.g. after a permute), so that a
    rewritten block returns what its original returned and the next block runs the same
    kernels."""
    if branch_layout and _is_channels_last(out):
        return torch.channels_last
    return torch.preserve_format


@_eager
def _split(x: Tensor, idx: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    x_all, rows = _Split.apply(x, idx, dim)  # type: ignore[no-untyped-call]
    return x_all, rows


@_eager
def _scatter_add(
    base: Tensor, out: Tensor, idx: Tensor, dim: int, scale: float, branch_layout: bool = False
) -> Tensor:
    """``base`` plus ``scale`` times the first ``len(idx)`` rows of ``out`` at rows ``idx``; the
    rest of ``out`` (rows run only to fill a bucket) is discarded."""
    k = idx.shape[0]
    if out.dim() == base.dim() and out.shape[dim] > k:
        out = out.narrow(dim, 0, k)
    _check_rows(out, base, dim, k)
    base, out = _common(base, out)
    fmt = _result_format(out, branch_layout)
    result: Tensor = _ScatterAdd.apply(base, out, idx, dim, scale, fmt)  # type: ignore[no-untyped-call]
    return result


class Residual(_DropBase):
    """A residual block ``shortcut(x) + drop_path(branch(x))`` that skips the dropped work.

    The module form of :func:`drop_add_residual` (see there for the modes and strategies), after
    Huang et al., "Deep Networks with Stochastic Depth" (ECCV 2016).

    Args:
        branch: the residual branch, stored as ``self.branch``.
        p: the probability of dropping the branch, in [0, 1]. Default: 0.0.
        shortcut: a module for the identity path, stored as ``self.shortcut``. Default: None.
        mode: ``"row"`` or ``"batch"``. Default: ``"row"``.
        batch_dim: the dimension that indexes samples. Default: 0.
        scale_by_keep: multiply the kept branch output by ``1 / (1 - p)``. Default: True.
        strategy: ``"auto"``, ``"subset"`` or ``"mask"``. Default: ``"auto"``.
        bucket: round subset batch sizes up to a multiple of ``bucket``. Default: None.

    ``p``, ``mode``, ``batch_dim``, ``scale_by_keep``, ``strategy`` and ``bucket`` are plain
    attributes that may be changed between steps; the state dict holds only ``branch.*`` and
    ``shortcut.*`` entries.

    Shape:
        - Input: :math:`(*)`, with the batch at ``batch_dim``.
        - Output: the shape of ``branch(x)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from droppath import Residual
        >>> block = Residual(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)), p=0.1)
        >>> block(torch.randn(4, 16)).shape
        torch.Size([4, 16])
        >>> list(block.state_dict())
        ['branch.0.weight', 'branch.0.bias', 'branch.1.weight', 'branch.1.bias']
    """

    def __init__(
        self,
        branch: nn.Module,
        p: float = 0.0,
        *,
        shortcut: nn.Module | None = None,
        mode: str = "row",
        batch_dim: int = 0,
        scale_by_keep: bool = True,
        strategy: str = "auto",
        bucket: int | None = None,
    ) -> None:
        super().__init__(p, mode, batch_dim, scale_by_keep)
        if not isinstance(branch, nn.Module):
            raise TypeError(f"branch must be an nn.Module, got {type(branch).__name__}")
        if shortcut is not None and not isinstance(shortcut, nn.Module):
            raise TypeError(f"shortcut must be an nn.Module or None, got {type(shortcut).__name__}")
        self.branch = branch
        self.shortcut = shortcut
        self.strategy = check_choice(strategy, "strategy", STRATEGIES)
        self.bucket = check_bucket(bucket)

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x):  # torch.fx: one node that follows train() / eval(), see droppath._fx
            node: Tensor = module_node(self, x, lambda training: self._residual(x, training))
            return node
        if not self.training:  # the plain residual; reads no rate (no guard under compile)
            base = x if self.shortcut is None else self.shortcut(x)
            out: Tensor = base + self.branch(x)
            return out
        if not (self.mode == "row" and self.strategy == "mask"):
            return _module_step(self, x)
        return self._residual(x, True)

    def _residual(self, x: Tensor, training: Any) -> Tensor:
        return drop_add_residual(
            x,
            self.branch,
            self.p,
            training,
            shortcut=self.shortcut,
            mode=self.mode,
            batch_dim=self.batch_dim,
            scale_by_keep=self.scale_by_keep,
            strategy=self.strategy,
            bucket=self.bucket,
        )

    def extra_repr(self) -> str:
        bucket = "" if self.bucket is None else f", bucket={self.bucket}"
        return f"{super().extra_repr()}, strategy={self.strategy!r}{bucket}"


@_host_side
def _module_step(block: Residual, x: Tensor) -> Tensor:
    """A training step of ``block`` whose settings are read here, on the host: under
    torch.compile, no graph reads the rate, so no guard is put on it whatever the PyTorch
    version (some specialize every float a graph reads)."""
    return _skipping_add(
        x,
        block.branch,
        block.p,
        block.shortcut,
        block.mode,
        block.batch_dim,
        block.scale_by_keep,
        block.strategy,
        block.bucket,
        None,
    )
