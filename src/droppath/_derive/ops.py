"""The run-time ops that derived forwards call (see ``droppath._derive``).

``add(block, site, base, branch, args)`` is ``base + block.<site>(branch(block, *args))`` with the
dropped work skipped (``radd``: the same sum with the branch first); ``rows(block, site, branch,
args)`` is ``block.<site>(branch(block, *args))`` with the dropped rows zeros and never computed.
The branch runs on the kept rows of every argument that holds one row per sample (a tensor whose
batch dimension has the batch size and that has at least ``BlockState.gather`` dimensions, 3 by
default, inside tuples, lists and dicts too); the others are passed whole. A shared ``(tokens,
dim)`` table whose tokens happen to equal the batch size is so never cut; a block that needs its
2-dimensional side inputs gathered is verified with 2 (see ``droppath.acceleration``). In training,
``add`` takes the step of every other site, ``droppath._engine.skip_add``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from droppath._checks import check_input
from droppath._derive.state import block_state
from droppath._engine import (
    DropSpec,
    Sum,
    draw,
    eager,
    gather,
    host_side,
    scatter_add,
    skip_add,
    split,
    zeros_for,
)

__all__ = [
    "ForcedDrop",
    "add",
    "by_products_asked",
    "radd",
    "reference",
    "rows",
    "stand_in",
]

BranchFn = Callable[..., Tensor]
_BASE = object()  # stands for the rows of the sum's base among a branch's arguments


class _Gathered:
    """A derived site's branch as ``drop_add_residual`` calls it: ``fn(block, *args)`` with the
    sum's base (marked ``_BASE`` among the arguments) taken from the call's argument: the full
    input, or the rows ``split`` took. ``at_rows`` gives the branch of some rows, its other
    per-sample arguments gathered. One class for both, so that under torch.compile a branch
    compiles once for every batch size. Its ``parameters()`` are the block's, which get zero
    gradients under DDP when every sample is dropped."""

    __slots__ = ("args", "block", "fn", "ref", "sides")

    def __init__(
        self,
        fn: BranchFn,
        block: nn.Module,
        args: tuple[Any, ...],
        ref: Tensor,
        sides: list[Any] | None = None,
    ) -> None:
        self.fn, self.block, self.args, self.ref = fn, block, args, ref
        # with a list: the branch returns (output, *values the forward reads after the site),
        # and the values are kept here
        self.sides = sides

    def __call__(self, x: Tensor | None) -> Tensor:
        out = self.fn(self.block, *[x if a is _BASE else a for a in self.args])
        if self.sides is None:
            return out
        self.sides[:] = out[1:]
        return out[0]

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.block.parameters()

    def modules(self) -> Iterator[nn.Module]:
        """The block's modules (a branch that communicates must run on every rank)."""
        return self.block.modules()

    def at_rows(self, run: Tensor, dim: int) -> _Gathered:
        return _at_rows(self, run, dim)


@eager
def _branch(
    fn: BranchFn, block: nn.Module, args: tuple[Any, ...], base: Any, sides: int
) -> _Gathered:
    """The branch of a sum into ``base`` (or, with ``base`` None, of a zero-filled output)."""
    holder: list[Any] | None = [] if sides else None
    if base is not None:
        return _Gathered(fn, block, tuple(_BASE if a is base else a for a in args), base, holder)
    ref = reference(args, 0)
    if ref is None:
        raise RuntimeError("droppath: a derived branch has no tensor input to take rows from")
    return _Gathered(fn, block, args, ref, holder)


@eager
def _with_sides(branch: _Gathered, out: Tensor, dim: int, n: int) -> tuple[Any, ...]:
    """``(out, *the values the branch returned beside it)``. A tensor among them with a row per
    sample run, not per sample (attention weights, say), has no rows for the dropped samples: it
    comes back as ``DroppedRows``, which raises when it is used."""
    if branch.sides is None:
        return (out,)
    if not branch.sides:  # the branch never ran (every sample dropped): run it on two rows
        with torch.no_grad():
            few = torch.arange(min(2, n), device=branch.ref.device)
            branch.at_rows(few, dim)(branch.ref.index_select(dim, few))
    return (out, *(stand_in(v, dim, n) for v in branch.sides))


class DroppedRows:
    """Stands for a per-sample value computed in a skipped branch: using it raises."""

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "droppath.accelerate: this value was computed in a skipped branch, for the kept "
            "samples only (attention weights, say); in training, call the model without asking "
            "for it (e.g. output_attentions=False)"
        )

    __getattr__ = __getitem__ = __iter__ = __len__ = __bool__ = __float__ = _fail

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return cls()._fail()


def by_products_asked(kwargs: dict[str, Any]) -> bool:
    """Whether a block's call asks for per-sample by-products of its branches (attention
    weights): ``output_attentions=True`` among its arguments (transformers 4), or an output
    recorder of transformers 5 collecting anything but the hidden states. The block then runs
    its own forward on that call, every sample through every branch, so that what is recorded
    covers the whole batch."""
    if kwargs.get("output_attentions"):
        return True
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    wanted: Any = collector.get() if collector is not None else None
    if not wanted:
        return False
    return any(k != "hidden_states" and not str(k).startswith("_") for k in wanted)


def stand_in(obj: Any, dim: int, n: int) -> Any:
    if isinstance(obj, Tensor):
        return DroppedRows() if obj.dim() > dim and obj.shape[dim] != n else obj
    if isinstance(obj, tuple | list):
        items = [stand_in(o, dim, n) for o in obj]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        return {k: stand_in(v, dim, n) for k, v in obj.items()}
    return obj


@eager
def _at_rows(branch: _Gathered, run: Tensor, dim: int) -> _Gathered:
    n = int(branch.ref.shape[dim])
    min_dims = block_state(branch.block).gather
    args = tuple(
        a if a is _BASE else gather(a, run, n, dim, min_dims=min_dims) for a in branch.args
    )
    return _Gathered(branch.fn, branch.block, args, branch.ref, branch.sides)


def reference(args: Any, dim: int) -> Tensor | None:
    """The first tensor argument with a batch dimension (inside lists and tuples too): where a
    branch's rows come from."""
    for a in args:
        if isinstance(a, Tensor) and a.dim() > dim and a.dim() >= 2:
            return a
        if isinstance(a, tuple | list):
            found = reference(a, dim)
            if found is not None:
                return found
    return None


@host_side
def add(
    block: nn.Module,
    site: str,
    base: Tensor,
    fn: BranchFn,
    args: tuple[Any, ...],
    *,
    sides: int = 0,
) -> Any:
    """``base + block.<site>(fn(block, *args))``, the dropped work skipped. With ``sides``, the
    branch returns that many values beside its output, which come back after the sum."""
    return _sum(getattr(block, site), base, _branch(fn, block, args, base, sides), False, sides)


@host_side
def radd(
    block: nn.Module,
    site: str,
    base: Tensor,
    fn: BranchFn,
    args: tuple[Any, ...],
    *,
    sides: int = 0,
) -> Any:
    """``add`` for ``block.<site>(fn(block, *args)) + base``: the branch output is the sum's
    first operand (whose memory format the sum takes)."""
    return _sum(getattr(block, site), base, _branch(fn, block, args, base, sides), True, sides)


@host_side
def _sum(drop: Any, base: Tensor, branch: _Gathered, branch_first: bool, sides: int) -> Any:
    if isinstance(drop, ForcedDrop):
        out = drop.add(base, branch, branch_first)
    elif not drop.training:
        y = branch(base)
        out = y + base if branch_first else base + y
    else:
        # the training step: this frame runs on the host, so no graph reads the rate
        spec = drop.spec
        check_input(base, spec.batch_dim)
        drop._ahead_rows = (base.shape[spec.batch_dim % base.dim()], base.device)  # draw_ahead
        out = skip_add(base, branch, spec, combine=Sum(branch_first))
        if out.data_ptr() == base.data_ptr():
            # every sample dropped: the sum is the base itself, which the block may then change
            # in place (an in-place activation after the sum) while autograd still needs it
            out = out.clone()
    if not sides:
        return out
    dim = int(getattr(drop, "batch_dim", 0)) % base.dim()
    return _with_sides(branch, out, dim, base.shape[dim])


@host_side
def rows(
    block: nn.Module, site: str, fn: BranchFn, args: tuple[Any, ...], *, sides: int = 0
) -> Any:
    """``block.<site>(fn(block, *args))``: the kept rows computed, the dropped ones zeros; with
    ``sides``, followed by the values the branch returns beside its output."""
    drop = getattr(block, site)
    branch = _branch(fn, block, args, None, sides)
    out = _rows(drop, block, site, branch)
    if not sides:
        return out
    dim = int(getattr(drop, "batch_dim", 0)) % branch.ref.dim()
    return _with_sides(branch, out, dim, branch.ref.shape[dim])


@host_side  # reads the rate, draws: never a frame of its own under torch.compile
def _rows(drop: Any, block: nn.Module, site: str, branch: _Gathered) -> Tensor:
    if isinstance(drop, ForcedDrop):
        return drop.rows(branch)
    spec: DropSpec = drop.spec
    if not drop.training or spec.p == 0.0:
        return branch(None)
    ref = branch.ref
    dim = spec.batch_dim % ref.dim()
    n = int(ref.shape[dim])
    drop._ahead_rows = (n, ref.device)  # what droppath.draw_ahead draws for
    kept = draw(spec, n, ref.device, branch=branch)
    if kept is True:
        return _remember(block, site, ref, dim, branch(None)) * spec.scale
    if kept is False:
        return _zeros(block, site, branch, ref, dim, n)
    idx, run = kept
    out = _remember(block, site, ref, dim, branch.at_rows(run, dim)(None))
    return _fill(out, idx, n, dim, spec.scale)


def _key(site: str, ref: Tensor, dim: int) -> tuple[Any, ...]:
    shape = list(ref.shape)
    del shape[dim]
    return site, tuple(shape), ref.dtype, dim


@eager
def _remember(block: nn.Module, site: str, ref: Tensor, dim: int, out: Tensor) -> Tensor:
    """``out``, its shape per row kept for the steps that drop every row (see ``_zeros``)."""
    shape = list(out.shape)
    shape[dim] = -1
    block_state(block).shapes[_key(site, ref, dim)] = (shape, out.dtype)
    return out


@eager
def _zeros(block: nn.Module, site: str, branch: _Gathered, ref: Tensor, dim: int, n: int) -> Tensor:
    """The output of a step that drops every row: zeros shaped like the branch's output, from the
    last run on inputs of this shape, or, the first time, from a look at two rows without
    gradients."""
    known = block_state(block).shapes.get(_key(site, ref, dim))
    if known is None:
        with torch.no_grad():
            few = torch.arange(min(2, n), device=ref.device)
            out = _remember(block, site, ref, dim, branch.at_rows(few, dim)(None))
        known = (list(out.shape), out.dtype)
        known[0][dim] = -1
    shape, dtype = known
    shape = [n if i == dim else s for i, s in enumerate(shape)]
    return zeros_for(ref, shape, dtype, branch)  # with the parameters' zero gradients


@eager
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
        x_all, rows_ = split(base, idx, dim)
        out = branch.at_rows(idx, dim)(rows_)
        return scatter_add(x_all, out, idx, dim, scale=self.scale, branch_layout=branch_first)

    def rows(self, branch: _Gathered) -> Tensor:
        kept, dim = self._kept(branch.ref)
        idx = kept.nonzero().squeeze(1)
        n = branch.ref.shape[dim]
        return _fill(branch.at_rows(idx, dim)(None), idx, n, dim, self.scale)
