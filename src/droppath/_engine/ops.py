"""The tensor operations of a skipping step, and how they run under torch.compile.

``split`` hands the input to the shortcut path and its kept rows to the branch, ``scatter_add``
adds the branch output back at those rows, ``skip`` stands for a step that drops every row, and
``keep_mask`` is the mask of the classic formulation. Each saves for backward only what its
gradient needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from droppath._engine.ranks import group

Branch = Callable[[Tensor], Tensor]
_F = TypeVar("_F", bound=Callable[..., Any])


def eager(fn: _F) -> _F:
    """Run ``fn`` and everything it calls eagerly under torch.compile: host-side draws and the
    small index operations around them, whose data-dependent sizes would break a graph anyway."""
    return cast(_F, torch.compiler.disable(fn))  # type: ignore[no-untyped-call]


def host_side(fn: _F) -> _F:
    """Run ``fn``'s own code eagerly under torch.compile; what it calls still compiles.

    ``fn`` makes host-side decisions (random draws, what to run) whose values must not become
    constants of a graph; the modules it calls (a branch, a shortcut) are compiled by dynamo as
    frames of their own. One graph break at each call of ``fn``.
    """
    return cast(_F, torch.compiler.disable(fn, recursive=False))  # type: ignore[no-untyped-call]


class _TouchParams(torch.autograd.Function):
    """Identity on ``x`` that gives zero gradients to ``params``.

    When a dropped branch is skipped, its parameters still receive a gradient (zeros), as the
    mask formulation gives them: the optimizer updates them as it would have (momentum, weight
    decay), and ``DistributedDataParallel`` with its default ``find_unused_parameters=False`` finds
    every parameter ready and neither raises nor hangs.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, *params: Tensor) -> Tensor:
        ctx.param_meta = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        return (grad, *_zero_grads(ctx))


def _zero_grads(ctx: Any) -> list[Tensor]:
    """Zeros for the parameters whose shapes a touching function's forward kept."""
    return [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.param_meta]


class _ScatterAdd(torch.autograd.Function):
    """``base`` with ``alpha * source`` added at ``idx`` along ``dim``, saving only ``idx``.

    ``Tensor.index_add`` keeps its whole ``source`` alive for backward (to shape its gradient),
    which would hold on to the branch output of every kept row; this only needs the indices.
    The forward is one out-of-place ``index_add``, or for a channels_last result a ``clone()``
    in that format and an in-place one (``index_add`` returns its result contiguous).
    """

    @staticmethod
    def forward(
        ctx: Any,
        base: Tensor,
        source: Tensor,
        idx: Tensor,
        dim: int,
        alpha: float,
        memory_format: torch.memory_format = torch.preserve_format,
    ) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.dim, ctx.alpha = dim, alpha
        if memory_format == torch.preserve_format and not is_channels_last(base):
            return torch.index_add(base, dim, idx, source, alpha=alpha)  # one pass, not two
        return base.clone(memory_format=memory_format).index_add_(dim, idx, source, alpha=alpha)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (idx,) = ctx.saved_tensors
        grad_rows = None
        if ctx.needs_input_grad[1]:
            grad_rows = rows(grad, idx, ctx.dim)
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
        return x.view_as(x), rows(x, idx, dim)

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
        elif not is_channels_last(grad_x):  # a new tensor: grad_x may be shared with other nodes
            return torch.index_add(grad_x, ctx.dim, idx, grad_rows), None, None
        else:
            grad_x = grad_x.clone()  # keeps channels_last, which index_add would not
        return grad_x.index_add_(ctx.dim, idx, grad_rows), None, None


def _needs_touch() -> bool:
    # the mask gives a skipped branch's parameters zero gradients (not None), in every process;
    # under DDP its reducer wants a gradient for every parameter at every step
    return torch.is_grad_enabled()


class _ZerosTouching(torch.autograd.Function):
    """A new tensor of zeros (not a view: the block may add into it in place) that gives zero
    gradients to ``params``."""

    @staticmethod
    def forward(
        ctx: Any, like: Tensor, shape: list[int], dtype: torch.dtype, *params: Tensor
    ) -> Tensor:
        ctx.param_meta = [(p.shape, p.dtype, p.device) for p in params]
        return like.new_zeros(shape, dtype=dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (None, None, None, *_zero_grads(ctx))


def _touched(branch: Any) -> list[Tensor]:
    """The parameters of ``branch`` that a skipped step gives zero gradients: those that need
    one, but a DeepSpeed ZeRO-3 partition (an empty tensor outside its module's call, whose
    gradient it reduces at the full size; gates agree, so every rank skips it alike)."""
    parameters = getattr(branch, "parameters", None)
    if not callable(parameters) or not _needs_touch():
        return []
    return [p for p in parameters() if p.requires_grad and not hasattr(p, "ds_id")]


@eager
def zeros_for(like: Tensor, shape: list[int], dtype: torch.dtype, branch: Any) -> Tensor:
    """The output of a branch that ran on no row: zeros of ``shape``, a new tensor, with zero
    gradients for the parameters of ``branch`` (see ``skip``)."""
    params = _touched(branch)
    if not params:
        return like.new_zeros(shape, dtype=dtype)
    out: Tensor = _ZerosTouching.apply(like, shape, dtype, *params)  # type: ignore[no-untyped-call]
    return out


@eager
def skip(base: Tensor, branch: Any) -> Tensor:
    """A step whose branch is dropped for every sample: ``base``, the branch never called.

    The parameters of ``branch`` (a module, or any callable with ``parameters()``) receive zero
    gradients, as the mask gives them (``_touched``)."""
    params = _touched(branch)
    if params:
        out: Tensor = _TouchParams.apply(base, *params)  # type: ignore[no-untyped-call]
        return out
    return base


def promoted(base: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """Both terms of a sum cast to their promoted dtype, as ``base + out`` would (autocast)."""
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


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is laid out channels_last and not also contiguous (a 4-D NHWC layout)."""
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def rows(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """``x.index_select(dim, idx)`` in ``x``'s memory format: a channels_last ``x`` gives
    channels_last rows (``index_select`` alone would return them contiguous), in one copy."""
    if not is_channels_last(x):
        return x.index_select(dim, idx)
    if dim == 0:  # gather whole NHWC rows, then view them as NCHW again
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return x.index_select(dim, idx).contiguous(memory_format=torch.channels_last)


def _result_format(out: Tensor, branch_layout: bool) -> torch.memory_format:
    """The memory format of the sum: ``base``'s, or with ``branch_layout`` the branch output's
    when it is channels_last (as ``branch + base`` gives, e.g. after a permute), so that a
    rewritten block returns what its original returned and the next block runs the same
    kernels."""
    if branch_layout and is_channels_last(out):
        return torch.channels_last
    return torch.preserve_format


@eager
def add(base: Tensor, out: Tensor, *, scale: float = 1.0, branch_layout: bool = False) -> Tensor:
    """``base + scale * out``, in the memory format of ``_result_format``."""
    base, out = promoted(base, out)
    if _result_format(out, branch_layout) == torch.channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    return torch.add(base, out, alpha=scale)


@eager
def split(x: Tensor, idx: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(x, x[idx])`` along ``dim`` as one autograd node (see ``_Split``)."""
    x_all, kept = _Split.apply(x, idx, dim)  # type: ignore[no-untyped-call]
    return x_all, kept


@eager
def scatter_add(
    base: Tensor,
    out: Tensor,
    idx: Tensor,
    dim: int,
    *,
    scale: float = 1.0,
    branch_layout: bool = False,
) -> Tensor:
    """``base`` plus ``scale`` times the first ``len(idx)`` rows of ``out`` at rows ``idx``; the
    rest of ``out`` (rows run only to fill a bucket) is discarded."""
    k = idx.shape[0]
    if out.dim() == base.dim() and out.shape[dim] > k:
        out = out.narrow(dim, 0, k)
    _check_rows(out, base, dim, k)
    base, out = promoted(base, out)
    fmt = _result_format(out, branch_layout)
    result: Tensor = _ScatterAdd.apply(base, out, idx, dim, scale, fmt)  # type: ignore[no-untyped-call]
    return result


def gather(obj: Any, idx: Tensor, n: int, dim: int, *, min_dims: int = 2, mark: bool = True) -> Any:
    """``obj`` with every tensor of at least ``min_dims`` dimensions whose size along ``dim`` is
    ``n`` taken at rows ``idx`` (marked dynamic along ``dim`` for torch.compile), inside tuples,
    lists and dicts too; everything else as it is.

    1-D tensors are left alone: in transformer layers they index positions (``cache_position``),
    and a sequence as long as the batch would otherwise be cut. Derived forwards
    (``droppath._derive.ops``) use it with ``min_dims=3`` first, for the same reason with
    ``(tokens, dim)`` tables. ``mark=False`` inside a graph being traced (its sizes are symbolic
    already).
    """
    if isinstance(obj, Tensor):
        if obj.dim() >= min_dims and obj.dim() > dim and obj.shape[dim] == n:
            taken = obj.index_select(dim, idx)
            if mark:
                torch._dynamo.maybe_mark_dynamic(taken, dim)
            return taken
        return obj
    if isinstance(obj, tuple | list):
        items = [gather(o, idx, n, dim, min_dims=min_dims, mark=mark) for o in obj]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        return {k: gather(v, idx, n, dim, min_dims=min_dims, mark=mark) for k, v in obj.items()}
    return obj


def keep_mask(
    x: Tensor,
    p: float,
    *,
    mode: str,
    batch_dim: int,
    scale_by_keep: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The multiplier of ``drop_path``: 0 for dropped rows, the scale for kept ones.

    ``batch_dim`` must already be non-negative. The draw is made in float32 whatever ``x``'s dtype,
    so that the keep probability is exact in float16 and bfloat16 as well; only the stored scale
    ``1 / (1 - p)`` is rounded to ``x``'s dtype.

    In a process group of ``world`` ranks, a row mask is this rank's slice of a draw of
    ``world * n`` rows: ranks seeded alike keep independent rows (every rank draws as many
    numbers, so their generators stay alike), and ranks seeded apart do anyway.
    """
    shape = [1] * x.dim()
    ranks = group() if mode == "row" else None
    if mode == "row":
        shape[batch_dim] = x.shape[batch_dim] * (1 if ranks is None else ranks[1])
    keep = 1.0 - p
    # Tensor ops with ``keep`` (not ``bernoulli_(keep)``): under torch.compile a changing rate
    # becomes one symbolic input of the graph instead of a constant that recompiles each step.
    if generator is None:  # rand(generator=None) fails on symbolic shapes under torch.compile
        noise = torch.rand(shape, dtype=torch.float32, device=x.device)
    else:
        noise = torch.rand(shape, dtype=torch.float32, device=x.device, generator=generator)
    if ranks is not None:
        n = x.shape[batch_dim]
        noise = noise.narrow(batch_dim, ranks[0] * n, n)
    mask = (noise < keep).to(torch.float32)
    if scale_by_keep and keep > 0.0:
        mask = mask / keep
    return mask.to(x.dtype)
