"""How a step's kept branch output joins the rest of the forward: the combinations.

Every put-back of droppath is one of three combinations, and each owns every form a step takes:

- ``Sum``: a residual, ``base + scale * out`` at the kept rows (``Residual``,
  ``drop_add_residual``, the sums of an accelerated block);
- ``Lerp``: a layer's output, ``lerp(x, L(x), scale)`` at the kept rows, ``x`` at the dropped
  ones (layer drop);
- ``Fill``: a branch output used otherwise than in a sum (concatenated, reshaped, returned): the
  output at the kept rows, zeros at the dropped ones (the "other use" of an accelerated block).

The forms: ``whole`` (every row kept), ``subset`` (the branch ran on some rows), ``masked`` (the
branch ran on every row, the mask weights them), ``dropped`` (no row kept: the branch never ran,
its parameters get zero gradients) and ``ahead`` (decisions drawn before the forward, a
traceable gather; ``droppath._engine.ahead``). The host-side step (``droppath._engine.step``)
takes the first four from decisions drawn now or forced (the check of an accelerated block); the
traceable steps take ``ahead``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from droppath._engine.ahead import Drawn, ahead_lerp, ahead_put
from droppath._engine.ops import add, eager, is_channels_last, promoted, scatter_add, skip

__all__ = [
    "FILL_AHEAD",
    "LERP",
    "SUM",
    "SUM_BRANCH_FIRST",
    "Combine",
    "Fill",
    "Lerp",
    "Subset",
    "Sum",
    "check_shape",
]


class Subset(NamedTuple):
    """The rows a step ran the branch on: ``idx``, the kept ones, along ``dim``; ``inputs``, the
    input at the rows run (the kept ones first, then the fillers that ``draw_rows`` adds; None
    for a combination that takes no rows of the input, ``Fill``)."""

    idx: Tensor
    dim: int
    inputs: Tensor | None


class Combine(Protocol):
    """How a kept branch output joins the base of the step (``Sum``, ``Lerp``, ``Fill``).
    ``takes_rows``: the step hands the branch the input's rows to run (``Fill``'s branch takes
    its rows itself); ``may_mask``: the step may mask instead of taking the subset."""

    takes_rows: bool
    may_mask: bool

    def whole(self, base: Tensor, out: Tensor, scale: float) -> Tensor:
        """Every row kept: ``out`` is the branch's output on all of them."""

    def subset(self, base: Tensor, out: Tensor, rows: Subset, scale: float) -> Tensor:
        """Some rows kept: ``out`` is the branch's output on ``rows.inputs``."""

    def masked(self, base: Tensor, out: Tensor, mask: Tensor) -> Tensor:
        """Some rows kept, the branch run on every row: ``mask`` is ``scale`` at the kept rows
        and 0 at the others, shaped to broadcast against ``out``."""

    def dropped(self, base: Tensor, branch: Any) -> Tensor:
        """No row kept: the branch never ran; its parameters get zero gradients."""

    def ahead(self, base: Tensor, out: Tensor, drawn: Drawn, dim: int) -> Tensor:
        """Decisions drawn ahead: ``out`` is the branch's output on ``drawn.run``'s rows."""


@dataclass(frozen=True)
class Sum:
    """A residual's combination: ``base + scale * out`` at the kept rows.

    The sum is in ``base``'s memory format, or with ``branch_layout`` in the branch output's when
    it is channels_last (as ``branch + base`` gives, e.g. after a permute), so that a rewritten
    block returns what its original returned and the next block runs the same kernels.
    """

    branch_layout: bool = False
    takes_rows = True
    may_mask = True

    @eager
    def whole(self, base: Tensor, out: Tensor, scale: float) -> Tensor:
        return add(base, out, scale=scale, branch_layout=self.branch_layout)

    @eager
    def subset(self, base: Tensor, out: Tensor, rows: Subset, scale: float) -> Tensor:
        layout = self.branch_layout
        return scatter_add(base, out, rows.idx, rows.dim, scale=scale, branch_layout=layout)

    @eager
    def masked(self, base: Tensor, out: Tensor, mask: Tensor) -> Tensor:
        base, out = promoted(base, out)
        if self.branch_layout and is_channels_last(out):
            base = base.contiguous(memory_format=torch.channels_last)
        return torch.addcmul(base, out, mask.to(out.dtype))

    @eager
    def dropped(self, base: Tensor, branch: Any) -> Tensor:
        return skip(base, branch)

    def ahead(self, base: Tensor, out: Tensor, drawn: Drawn, dim: int) -> Tensor:
        return ahead_put(base, out, drawn, dim, branch_layout=self.branch_layout)


SUM = Sum()
SUM_BRANCH_FIRST = Sum(branch_layout=True)  # ``branch + base``


def check_shape(out: Tensor, inputs: Tensor) -> None:
    """A layer's hidden states must come back in the shape they went in."""
    if out.shape != inputs.shape:
        raise ValueError(
            f"layer output must have the shape of its input, got {tuple(out.shape)} for "
            f"an input of shape {tuple(inputs.shape)}"
        )


class Lerp:
    """Layer drop's combination: a kept row becomes ``x + scale * (L(x) - x)``, computed as
    ``lerp``, which gives exactly ``L(x)`` when ``scale`` is 1 (its end point at weight 1); a
    dropped row stays ``x``."""

    takes_rows = True
    may_mask = True

    @eager
    def whole(self, base: Tensor, out: Tensor, scale: float) -> Tensor:
        return out if scale == 1.0 else torch.lerp(base.to(out.dtype), out, scale)

    @eager
    def subset(self, base: Tensor, out: Tensor, rows: Subset, scale: float) -> Tensor:
        k, dim, inputs = rows.idx.shape[0], rows.dim, rows.inputs
        assert inputs is not None
        if out.shape[dim] > k:  # rows run only to avoid a batch of one
            out, inputs = out.narrow(dim, 0, k), inputs.narrow(dim, 0, k)
        check_shape(out, inputs)
        new = torch.lerp(inputs.to(out.dtype), out, scale) if scale != 1.0 else out
        return base.to(new.dtype).index_copy(dim, rows.idx, new)

    @eager
    def masked(self, base: Tensor, out: Tensor, mask: Tensor) -> Tensor:
        return torch.lerp(base.to(out.dtype), out, mask.to(out.dtype))

    @eager
    def dropped(self, base: Tensor, branch: Any) -> Tensor:
        return skip(base, branch)

    def ahead(self, base: Tensor, out: Tensor, drawn: Drawn, dim: int) -> Tensor:
        return ahead_lerp(base, out, drawn, dim)


LERP = Lerp()


class Fill:
    """The combination of a branch output used otherwise than in a sum: at the kept rows the
    output times the scale, at the dropped ones zeros. ``base`` is the tensor whose rows the
    decisions are for (the branch gathers its own inputs: ``takes_rows`` is False).

    ``zeros(branch)`` makes the output of a step that keeps no row (zeros shaped like the
    branch's output, with zero gradients for its parameters); ``seen(out, rows_dim)`` is told
    the output of every step that ran the branch (its shape, for ``zeros``)."""

    takes_rows = False
    may_mask = False  # a site used this way takes the subset, whatever its strategy

    def __init__(
        self,
        zeros: Callable[[Any], Tensor] | None = None,
        seen: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self._zeros, self._seen = zeros, seen

    def seen(self, out: Tensor) -> Tensor:
        return out if self._seen is None else self._seen(out)

    @eager
    def whole(self, base: Tensor, out: Tensor, scale: float) -> Tensor:
        return self.seen(out) * scale

    @eager
    def subset(self, base: Tensor, out: Tensor, rows: Subset, scale: float) -> Tensor:
        out, dim = self.seen(out), rows.dim
        k = rows.idx.shape[0]
        out = out.narrow(dim, 0, k)
        shape = list(out.shape)
        shape[dim] = base.shape[dim]
        return out.new_zeros(shape).index_add(dim, rows.idx, out, alpha=scale)

    def masked(self, base: Tensor, out: Tensor, mask: Tensor) -> Tensor:
        raise AssertionError("Fill never masks (may_mask is False)")

    @eager
    def dropped(self, base: Tensor, branch: Any) -> Tensor:
        if self._zeros is None:
            raise RuntimeError("droppath: this Fill has no zeros to give for a dropped step")
        return self._zeros(branch)

    def ahead(self, base: Any, out: Tensor, drawn: Drawn, dim: int) -> Tensor:
        return ahead_put(None, out, drawn, dim)


FILL_AHEAD = Fill()  # the drawn-ahead form needs neither zeros nor shapes
