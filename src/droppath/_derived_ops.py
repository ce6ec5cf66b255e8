"""The run-time ops that derived forwards call (see ``droppath._derive``).

``add(block, site, base, branch, args, branch_first)`` is ``base + block.<site>(branch(block,
*args))`` with the dropped work skipped; ``rows(block, site, branch, args)`` is
``block.<site>(branch(block, *args))`` with the dropped rows zeros and never computed. The branch
runs on the kept rows of every argument that holds one row per sample (a tensor whose batch
dimension has the batch size and that has at least ``block._droppath_gather`` dimensions, 3 by
default, inside tuples, lists and dicts too); the others are passed whole. A shared ``(tokens,
dim)`` table whose tokens happen to equal the batch size is so never cut; a block that needs its
2-dimensional side inputs gathered is verified with 2 (see ``droppath.acceleration``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from droppath import residual
from droppath.residual import (
    _eager,
    _host_side,
    _scatter_add,
    _skipping_add,
    _split,
)

__all__ = ["ForcedDrop", "add", "rows"]

BranchFn = Callable[..., Tensor]
_BASE = object()  # stands for the rows of the sum's base among a branch's arguments


GATHER = "_droppath_gather"


def _gather(obj: Any, idx: Tensor, n: int, dim: int, min_dims: int) -> Any:
    """``obj`` with every tensor of at least ``min_dims`` dimensions whose size along ``dim`` is
    ``n`` taken at rows ``idx``, inside tuples, lists and dicts too; everything else as it is."""
    if isinstance(obj, Tensor):
        if obj.dim() >= min_dims and obj.dim() > dim and obj.shape[dim] == n:
            rows = obj.index_select(dim, idx)
            torch._dynamo.maybe_mark_dynamic(rows, dim)
            return rows
        return obj
    if isinstance(obj, tuple | list):
        items = [_gather(o, idx, n, dim, min_dims) for o in obj]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        return {k: _gather(v, idx, n, dim, min_dims) for k, v in obj.items()}
    return obj


class _Gathered:
    """A derived site's branch as ``drop_add_residual`` calls it: with the full batch it calls
    ``fn(block, *args)``; :meth:`at_rows` gives the branch of the rows to run. Its
    ``parameters()`` are the block's, which get zero gradients under DDP when every sample is
    dropped."""

    __slots__ = ("args", "base", "block", "fn")

    def __init__(self, fn: BranchFn, block: nn.Module, args: tuple[Any, ...], base: Any) -> None:
        self.fn, self.block, self.args, self.base = fn, block, args, base

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(self.block, *self.args)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.block.parameters()

    def at_rows(self, run: Tensor, dim: int) -> _AtRows:
        return _AtRows(self, run, dim)


class _AtRows:
    """The branch on rows ``run``: the base's rows come in as the argument (``_split`` took
    them), every other per-sample argument is gathered here."""

    __slots__ = ("args", "block", "fn")

    def __init__(self, branch: _Gathered, run: Tensor, dim: int) -> None:
        self.fn, self.block = branch.fn, branch.block
        n = _batch_size(branch.base, branch.args, dim)
        min_dims = int(branch.block.__dict__.get(GATHER, 3))
        self.args = _gathered_args(branch.args, branch.base, run, n, dim, min_dims)

    def __call__(self, rows: Tensor | None) -> Tensor:
        args = [rows if a is _BASE else a for a in self.args]
        return self.fn(self.block, *args)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.block.parameters()


@_eager
def _gathered_args(
    args: tuple[Any, ...], base: Any, run: Tensor, n: int, dim: int, min_dims: int
) -> tuple[Any, ...]:
    return tuple(
        _BASE if a is base and base is not None else _gather(a, run, n, dim, min_dims) for a in args
    )


def _batch_size(base: Any, args: tuple[Any, ...], dim: int) -> int:
    if isinstance(base, Tensor):
        return int(base.shape[dim])
    ref = _reference(args, dim)
    if ref is None:
        raise RuntimeError("droppath: a derived branch has no tensor input to take rows from")
    return int(ref.shape[dim])


def _reference(args: tuple[Any, ...], dim: int) -> Tensor | None:
    """The first tensor argument with a batch dimension: where a branch's rows come from."""
    for a in args:
        if isinstance(a, Tensor) and a.dim() > dim and a.dim() >= 2:
            return a
    return None


@_host_side
def add(
    block: nn.Module,
    site: str,
    base: Tensor,
    fn: BranchFn,
    args: tuple[Any, ...],
    branch_first: bool,
) -> Tensor:
    """``base + block.<site>(fn(block, *args))``, the dropped work skipped."""
    drop = getattr(block, site)
    if isinstance(drop, ForcedDrop):
        return drop.add(base, _Gathered(fn, block, args, base), branch_first)
    if not drop.training:
        out = fn(block, *args)
        return out + base if branch_first else base + out
    # drop_add_residual's training step, called directly: this frame runs on the host
    return _skipping_add(
        base,
        _Gathered(fn, block, args, base),
        float(drop.p),
        None,
        drop.mode,
        drop.batch_dim,
        drop.scale_by_keep,
        "auto",
        None,
        None,
        branch_first,
    )


@_host_side
def rows(block: nn.Module, site: str, fn: BranchFn, args: tuple[Any, ...]) -> Tensor:
    """``block.<site>(fn(block, *args))``: the kept rows computed, the dropped ones zeros."""
    drop = getattr(block, site)
    branch = _Gathered(fn, block, args, None)
    if isinstance(drop, ForcedDrop):
        return drop.rows(branch, args)
    p = float(drop.p)
    if not drop.training or p == 0.0:
        return fn(block, *args)
    keep = 1.0 - p
    scale = 1.0 / keep if drop.scale_by_keep and keep > 0.0 else 1.0
    ref = _reference(args, 0)
    if drop.mode == "batch" or ref is None:
        if keep > 0.0 and residual._draw_gate(keep, None):
            return fn(block, *args) * scale
        return fn(block, *args) * 0.0  # the output's shape is only known by running it
    dim = drop.batch_dim % ref.dim()
    n = ref.shape[dim]
    idx, run = residual._draw_rows(n, keep, ref.device, None, None)
    k = idx.shape[0]
    if k == n:
        return fn(block, *args) * scale
    if k == 0:  # every row dropped: zeros, shaped by a look at two rows, without gradients
        with torch.no_grad():
            few = torch.arange(min(2, n), device=ref.device)
            out = branch.at_rows(few, dim)(None)
        return _fill(out, idx, n, dim, scale)
    out = branch.at_rows(run, dim)(None)
    return _fill(out, idx, n, dim, scale)


@_eager
def _fill(out: Tensor, idx: Tensor, n: int, dim: int, scale: float) -> Tensor:
    """A tensor of ``n`` rows along ``dim``: zeros, and ``scale`` times ``out``'s first rows at
    ``idx``."""
    k = idx.shape[0]
    out = out.narrow(dim, 0, k)
    shape = list(out.shape)
    shape[dim] = n
    return out.new_zeros(shape).index_add(dim, idx, out, alpha=scale)


class ForcedDrop(nn.Module):
    """A site's stand-in while a derived forward is verified: the same keep decisions for the
    original forward (a mask, as the site computes it) and the derived one (the rows), drawn from
    ``decide(n)`` in call order."""

    def __init__(self, site: nn.Module, decide: Callable[[int], Tensor]) -> None:
        super().__init__()
        p = float(getattr(site, "p", 0.5))
        keep = 1.0 - p if 0.0 < p < 1.0 else 0.5
        self.scale = 1.0 / keep if getattr(site, "scale_by_keep", True) else 1.0
        self.batch_dim = int(getattr(site, "batch_dim", 0))
        self.decide = decide

    def _kept(self, x: Tensor) -> tuple[Tensor, int]:
        dim = self.batch_dim % x.dim()
        return self.decide(x.shape[dim]).to(x.device), dim

    def forward(self, x: Tensor) -> Tensor:
        kept, dim = self._kept(x)
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        mask = (kept.to(torch.float32) * self.scale).to(x.dtype).reshape(shape)
        return x * mask

    def add(self, base: Tensor, branch: _Gathered, branch_first: bool) -> Tensor:
        kept, dim = self._kept(base)
        idx = kept.nonzero().squeeze(1)
        x_all, rows_ = _split(base, idx, dim)
        out = branch.at_rows(idx, dim)(rows_)
        return _scatter_add(x_all, out, idx, dim, self.scale, branch_first)

    def rows(self, branch: _Gathered, args: tuple[Any, ...]) -> Tensor:
        ref = _reference(args, 0)
        if ref is None:
            raise RuntimeError("no tensor input to take the rows from")
        kept, dim = self._kept(ref)
        idx = kept.nonzero().squeeze(1)
        return _fill(branch.at_rows(idx, dim)(None), idx, ref.shape[dim], dim, self.scale)
