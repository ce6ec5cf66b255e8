"""The run-time ops that derived forwards call (see ``droppath._derive``).

``add(block, site, base, branch, args)`` is ``base + block.<site>(branch(block, *args))`` with the
dropped work skipped (``radd``: the same sum with the branch first); ``rows(block, site, branch,
args)`` is ``block.<site>(branch(block, *args))`` with the dropped rows zeros and never computed.
The branch runs on the kept rows of every argument that holds one row per sample (a tensor whose
batch dimension has the batch size and that has at least ``BlockState.gather`` dimensions, 3 by
default, inside tuples, lists and dicts too); the others are passed whole. A shared ``(tokens,
dim)`` table whose tokens happen to equal the batch size is so never cut; a block that needs its
2-dimensional side inputs gathered is verified with 2 (see ``droppath.acceleration``). In training
and in the check alike, each takes the step of every other site, ``droppath._engine.skip_add``,
with the engine's ``Sum`` or ``Fill``; the check only forces the decisions (``ForcedDrop``).
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
    SUM,
    SUM_BRANCH_FIRST,
    DropSpec,
    Fill,
    eager,
    forced,
    gather,
    host_side,
    skip_add,
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
_NO_KWARGS: dict[str, Any] = {}


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
        return self.finish(self.fn(self.block, *[x if a is _BASE else a for a in self.args]))

    def direct(self, x: Tensor | None) -> tuple[BranchFn, tuple[Any, ...], dict[str, Any]]:
        """What the engine's step calls for ``self(x)`` (then ``finish``): the derived branch
        function itself, so that no frame stands between the step and the branch's code."""
        return self.fn, (self.block, *[x if a is _BASE else a for a in self.args]), _NO_KWARGS

    def finish(self, out: Any) -> Tensor:
        """The branch's output; with ``sides``, the values returned beside it are kept."""
        if self.sides is None:
            result: Tensor = out
            return result
        self.sides[:] = out[1:]
        first: Tensor = out[0]
        return first

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


def _summing(branch_first: bool) -> Callable[..., Any]:
    """``add``, or with ``branch_first`` ``radd``: one step, two sums."""
    combine = SUM_BRANCH_FIRST if branch_first else SUM

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
        drop = getattr(block, site)
        branch = _branch(fn, block, args, base, sides)
        forced = isinstance(drop, ForcedDrop)  # the check: its decisions, the same step
        if forced or drop.training:
            spec = drop.spec
            decide = drop.decisions if forced else None
            check_input(base, spec.batch_dim)
            if not forced:  # what draw_ahead draws for
                drop._ahead_rows = (base.shape[spec.batch_dim % base.dim()], base.device)
            # the training step: this frame runs on the host, so no graph reads the rate
            out = skip_add(base, branch, spec, combine=combine, source=decide)
            if out.data_ptr() == base.data_ptr():
                # every sample dropped: the sum is the base itself, which the block may then
                # change in place (an in-place activation after it) while autograd needs it
                out = out.clone()
        else:
            y = branch(base)
            out = y + base if branch_first else base + y
        if not sides:
            return out
        dim = int(getattr(drop, "batch_dim", 0)) % base.dim()
        return _with_sides(branch, out, dim, base.shape[dim])

    return add


add = _summing(False)
add.__doc__ = """``base + block.<site>(fn(block, *args))``, the dropped work skipped: the engine's
step with its ``Sum``, decisions drawn now, or forced by the check (``ForcedDrop``). With
``sides``, the branch returns that many values beside its output, which come back after the
sum."""
radd = _summing(True)
radd.__doc__ = """``add`` for ``block.<site>(fn(block, *args)) + base``: the branch output is the
sum's first operand (whose memory format the sum takes)."""


@host_side
def rows(
    block: nn.Module, site: str, fn: BranchFn, args: tuple[Any, ...], *, sides: int = 0
) -> Any:
    """``block.<site>(fn(block, *args))``: the kept rows computed, the dropped ones zeros (the
    engine's step with its ``Fill``); with ``sides``, followed by the values the branch returns
    beside its output."""
    drop = getattr(block, site)
    branch = _branch(fn, block, args, None, sides)
    ref = branch.ref
    dim = int(getattr(drop, "batch_dim", 0)) % ref.dim()
    forced = isinstance(drop, ForcedDrop)  # the check: its decisions, the same step
    if forced or (drop.training and drop.spec.p > 0.0):
        decide = drop.decisions if forced else None
        if not forced:  # what draw_ahead draws for
            drop._ahead_rows = (int(ref.shape[dim]), ref.device)
        fill = _fill(block, site, ref, dim)
        out = skip_add(ref, branch, drop.spec, combine=fill, source=decide)
    else:
        out = branch(None)
    if not sides:
        return out
    return _with_sides(branch, out, dim, ref.shape[dim])


def _fill(block: nn.Module, site: str, ref: Tensor, dim: int) -> Fill:
    """The ``Fill`` of a site used otherwise than in a sum: its output shape is remembered by
    the steps that run the branch, for those that drop every row (zeros of that shape)."""
    return Fill(
        zeros=lambda branch: _zeros(block, site, branch, ref, dim, int(ref.shape[dim])),
        seen=lambda out: _remember(block, site, ref, dim, out),
    )


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


class ForcedDrop(nn.Module):
    """A site's stand-in while a derived forward is verified: the same keep decisions for the
    original forward (a mask, as the site computes it) and the derived one, drawn from
    ``decide(n)`` in call order. The derived forward takes the engine's step with them
    (``decisions``), the step it takes in training."""

    def __init__(self, site: nn.Module, decide: Callable[[int], Tensor]) -> None:
        super().__init__()
        p = float(getattr(site, "p", 0.5))
        keep = 1.0 - p if 0.0 < p < 1.0 else 0.5
        scale_by_keep = bool(getattr(site, "scale_by_keep", True))
        self.batch_dim = int(getattr(site, "batch_dim", 0))
        bucket = getattr(getattr(site, "spec", None), "bucket", None)
        self.spec = DropSpec(
            1.0 - keep,
            batch_dim=self.batch_dim,
            scale_by_keep=scale_by_keep,
            strategy="subset",
            bucket=bucket,
        )
        self.scale = self.spec.scale
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

    def decisions(self, n: int, device: torch.device, branch: Any) -> Any:
        """The next decisions, for the engine's step (``droppath._engine.forced``)."""
        return forced(self.decide(n), device, self.spec.bucket, branch=branch)
