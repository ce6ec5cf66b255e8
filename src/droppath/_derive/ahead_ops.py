"""The run-time ops of a derived forward whose sites' decisions were drawn before the model's
forward (``droppath.draw_ahead``): ``add_ahead``, ``radd_ahead`` and ``rows_ahead`` compute what
``droppath._derive.ops``'s ``add``, ``radd`` and ``rows`` compute, with traceable tensor
operations only (``droppath._engine.ahead``), so that under torch.compile the block is part of the
model's graph. A site without decisions that fit (drawn for another batch size) takes the
host-side op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from droppath._derive.ops import BranchFn, add, radd, reference, rows, stand_in
from droppath._derive.state import block_state
from droppath._engine import FILL_AHEAD, SUM, SUM_BRANCH_FIRST, Drawn, ahead_rows, fitting, gather

__all__ = ["AHEAD_OPS", "add_ahead", "radd_ahead", "rows_ahead"]


def _drawn(drop: Any, ref: Tensor) -> tuple[Drawn, int] | None:
    """The site's decisions for ``ref``'s rows and its batch dimension, if it has some."""
    drawn: Drawn | None = getattr(drop, "_ahead", None)
    dim = fitting(drawn, ref, int(drop.batch_dim)) if drop.training else None
    return None if drawn is None or dim is None else (drawn, dim)


def _taken(block: nn.Module, args: tuple[Any, ...], base: Any, drawn: Drawn, dim: int) -> Any:
    """``args`` at the rows to run: ``base`` (the sum's base, if any) by a gather whose backward
    is a gather, the other per-sample arguments as ``at_rows`` takes them."""
    n = drawn.rows.shape[0]  # the batch size the decisions fit
    min_dims = block_state(block).gather
    taken = None if base is None else ahead_rows(base, drawn, dim)
    return tuple(
        taken if a is base else gather(a, drawn.run, n, dim, min_dims=min_dims, mark=False)
        for a in args
    )


def _run(
    block: nn.Module,
    fn: BranchFn,
    args: tuple[Any, ...],
    base: Tensor | None,
    found: tuple[Drawn, int],
    sides: int,
) -> tuple[Tensor, tuple[Any, ...]]:
    """The branch on the rows to run: its output, and with ``sides`` the values it returns beside
    it (one with a row per row run stands for rows that were not all computed: ``DroppedRows``,
    as on the host)."""
    drawn, dim = found
    result = fn(block, *_taken(block, args, base, drawn, dim))
    if not sides:
        return result, ()
    n = drawn.rows.shape[0]
    return result[0], tuple(stand_in(v, dim, n) for v in result[1:])


def _summing_ahead(branch_first: bool) -> Callable[..., Any]:
    """``add_ahead``, or with ``branch_first`` ``radd_ahead``: one op, two sums."""
    combine = SUM_BRANCH_FIRST if branch_first else SUM
    host = radd if branch_first else add

    def add_ahead(
        block: nn.Module,
        site: str,
        base: Tensor,
        fn: BranchFn,
        args: tuple[Any, ...],
        *,
        sides: int = 0,
    ) -> Any:
        found = _drawn(getattr(block, site), base)
        if found is None:
            return host(block, site, base, fn, args, sides=sides)
        out, rest = _run(block, fn, args, base, found, sides)
        y = combine.ahead(base, out, *found)
        return (y, *rest) if sides else y

    return add_ahead


add_ahead = _summing_ahead(False)
add_ahead.__doc__ = "``add`` with the site's decisions drawn ahead."
radd_ahead = _summing_ahead(True)
radd_ahead.__doc__ = "``radd`` with the site's decisions drawn ahead."


def rows_ahead(
    block: nn.Module, site: str, fn: BranchFn, args: tuple[Any, ...], *, sides: int = 0
) -> Any:
    """``rows`` with the site's decisions drawn ahead."""
    ref = reference(args, 0)
    found = None if ref is None else _drawn(getattr(block, site), ref)
    if found is None:
        return rows(block, site, fn, args, sides=sides)
    out, rest = _run(block, fn, args, None, found, sides)
    y = FILL_AHEAD.ahead(None, out, *found)
    return (y, *rest) if sides else y


AHEAD_OPS = (add_ahead, radd_ahead, rows_ahead)
