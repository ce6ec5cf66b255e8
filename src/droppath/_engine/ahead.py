"""Keep decisions drawn ahead of a forward, so that a compiled model runs as one graph.

The host-side step (``droppath._engine.step.skip_add``) draws each site's decisions when the
site runs; under torch.compile that costs one graph break per site and forward. Drawn ahead, on
the host, before the model's forward (``predraw``, called by the hook that
``droppath.draw_ahead`` installs), a site's decisions enter the graph as tensors (``Drawn``): the
rows to run the branch on, and each row's scale (0 where dropped). Their lengths are dynamic, so
every draw reuses one graph; the rate lives only in the tensors' values, so a schedule recompiles
nothing. ``ahead_rows`` takes the rows to run and ``ahead_put`` / ``ahead_lerp`` put their
output back, gathers forward and backward; the combinations' ``ahead`` forms
(``droppath._engine.combine``) and ``droppath._engine.step.ahead_add`` are built on them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from droppath._engine.draws import draw_kept, draw_rows, to_device
from droppath._engine.ops import eager, is_channels_last, promoted
from droppath._engine.spec import DropSpec


class Drawn(NamedTuple):
    """One site's decisions for one forward, on the site's device.

    ``run``: the indices of the rows to run (at least two of ``n`` when ``n`` allows: a batch
    of one is specialized by torch.compile and rejected by BatchNorm), the kept ones first;
    ``where``: for each of the ``n`` rows, its position in ``run`` (0 for a dropped row);
    ``rows``: float32, for each of the ``n`` rows, ``scale`` if kept, else 0."""

    run: Tensor
    where: Tensor
    rows: Tensor

    @property
    def weights(self) -> Tensor:
        """The weight of each row run: its scale if kept, 0 for a filler (a dropped row)."""
        return self.rows.index_select(0, self.run)


def fitting(drawn: Drawn | None, x: Tensor, batch_dim: int) -> int | None:
    """The batch dimension of ``x`` if ``drawn`` was drawn for its rows, else None (the site
    takes its host-side step)."""
    if drawn is None:
        return None
    dim = batch_dim % x.dim()
    return dim if drawn.rows.shape[0] == x.shape[dim] else None


@eager
def predraw(
    spec: DropSpec,
    n: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    *,
    every_row: bool = False,
) -> Drawn:
    """The decisions of a row-mode step of ``spec`` over ``n`` rows, drawn on the host now.

    The same draws as ``draw_rows`` (an independent Bernoulli(1 - p) per row, from the same
    random state), so a site keeps each row with probability exactly ``1 - p``. A step that
    keeps every row runs them all with weight ``scale``; one that keeps none runs two fillers
    with weight 0 (their gradients are zeros, so DDP finds every parameter used). With
    ``every_row``, the mask: every row runs, each weighted by its decision.
    """
    if every_row:
        kept = torch.ones(n, dtype=torch.bool)
        if 0.0 < spec.p:
            kept = draw_kept(n, 1.0 - spec.p, generator)
        rows = kept.to(torch.float32) * spec.scale
        return _placed(Drawn(torch.arange(n), torch.arange(n), rows), device)
    if spec.p == 0.0:
        idx = run = torch.arange(n)
    elif spec.p == 1.0:
        idx, run = torch.arange(0), torch.arange(min(2, n))
    else:
        idx, run = draw_rows(
            n, 1.0 - spec.p, torch.device("cpu"), generator=generator, bucket=spec.bucket
        )
        if run.shape[0] < min(2, n):  # none kept: draw_rows runs nothing
            run = torch.arange(min(2, n))
    where = torch.zeros(n, dtype=torch.long)
    where[idx] = torch.arange(idx.shape[0])
    rows = torch.zeros(n, dtype=torch.float32)
    rows[idx] = spec.scale
    return _placed(Drawn(run, where, rows), device)


def _placed(drawn: Drawn, device: torch.device) -> Drawn:
    """``drawn`` on ``device``, its lengths marked dynamic for torch.compile."""
    drawn = Drawn(*(to_device(t, device) for t in drawn))
    for t in drawn:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return drawn


def _along(t: Tensor, dim: int, ndim: int) -> Tensor:
    """The 1-D ``t`` shaped to broadcast along ``dim`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return t.view(shape)


def _spread(src: Tensor, drawn: Drawn, dim: int) -> Tensor:
    """``src``'s rows (one per row run) at the rows of the batch: at a kept row, the row of
    ``src`` that ran for it times the scale; at a dropped one, 0. A gather, not a scatter (on a
    CPU or GPU a gather vectorizes and fuses with what follows; a scatter adds atomically)."""
    rows = _along(drawn.rows, dim, src.dim())
    picked = src.index_select(dim, drawn.where)
    return torch.where(rows > 0, picked * rows.to(src.dtype), 0)


class _Take(torch.autograd.Function):
    """``x``'s rows to run (``x.index_select(dim, run)``), whose backward is a gather too: the
    gradient at a kept row is the gradient of its row run, at a dropped row 0 (a filler's is 0:
    its output is weighted 0)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, drawn: Drawn, dim: int) -> Tensor:
        ctx.save_for_backward(drawn.where, drawn.rows)
        ctx.dim = dim
        return x.index_select(dim, drawn.run)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        where, rows = ctx.saved_tensors
        kept = _along(rows, ctx.dim, grad.dim()) > 0
        return torch.where(kept, grad.index_select(ctx.dim, where), 0), None, None


class _Put(torch.autograd.Function):
    """The branch output of the rows run, weighted, at the rows they ran for, 0 elsewhere;
    plus ``base`` when there is one. With ``lerp`` (a layer's output, not a branch's): at a
    kept row ``lerp(base, out, scale)``, exactly ``out`` at scale 1; at a dropped row ``base``."""

    @staticmethod
    def forward(
        ctx: Any, base: Tensor | None, out: Tensor, drawn: Drawn, dim: int, lerp: bool
    ) -> Tensor:
        ctx.save_for_backward(drawn.run, drawn.rows)
        ctx.dim, ctx.has_base, ctx.lerp = dim, base is not None, lerp
        if lerp and base is not None:  # ahead_lerp
            rows = _along(drawn.rows, dim, out.dim())
            picked = out.index_select(dim, drawn.where)
            return torch.where(rows > 0, torch.lerp(base, picked, rows.to(out.dtype)), base)
        spread = _spread(out, drawn, dim)
        return spread if base is None else base + spread

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        run, rows = ctx.saved_tensors
        weights = _along(rows.index_select(0, run), ctx.dim, grad.dim())
        grad_out = grad.index_select(ctx.dim, run) * weights.to(grad.dtype)
        grad_base = grad if ctx.has_base else None
        if ctx.lerp and grad_base is not None:  # d lerp(b, o, w) / db = 1 - w at a kept row
            along = _along(rows, ctx.dim, grad.dim()).to(grad.dtype)
            grad_base = grad * torch.where(along > 0, 1 - along, 1)
        return grad_base, grad_out, None, None, None


def ahead_rows(x: Tensor, drawn: Drawn, dim: int) -> Tensor:
    """``x``'s rows to run under ``drawn``, a gather whose backward is a gather too."""
    rows: Tensor = _Take.apply(x, drawn, dim)  # type: ignore[no-untyped-call]
    return rows


def ahead_put(
    base: Tensor | None, out: Tensor, drawn: Drawn, dim: int, *, branch_layout: bool = False
) -> Tensor:
    """``base`` (zeros without one) plus ``out``, the branch output of ``drawn.run``'s rows,
    weighted, at those rows: a gather, forward and backward. The result is in ``base``'s
    memory format, or with ``branch_layout`` in ``out``'s when that is channels_last (as
    ``out + base`` gives)."""
    if base is not None:
        base, out = promoted(base, out)
    y: Tensor = _Put.apply(base, out, drawn, dim, False)  # type: ignore[no-untyped-call]
    ref = out if branch_layout or base is None else base
    if is_channels_last(ref) and not is_channels_last(y):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def ahead_lerp(x: Tensor, out: Tensor, drawn: Drawn, dim: int) -> Tensor:
    """Layer drop's combination under ``drawn``: ``out`` is a whole layer's output on
    ``drawn.run``'s rows, and a kept row of ``x`` becomes ``lerp(x, out, scale)`` (exactly
    ``out`` at scale 1), a dropped one stays ``x``; in ``out``'s dtype, a gather forward and
    backward."""
    y: Tensor = _Put.apply(x.to(out.dtype), out, drawn, dim, True)  # type: ignore[no-untyped-call]
    return y
