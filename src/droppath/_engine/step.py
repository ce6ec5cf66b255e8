"""The training step of a drop-path site: ``skip_add`` skips the dropped work, ``mask_add``
masks it. ``Residual``, ``drop_add_residual``, ``LayerDrop`` and the forwards that ``accelerate``
derives all take their step here; which of the two a site takes is ``DropSpec.skips``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from droppath._engine.cost import AutoChoice, Clock
from droppath._engine.draws import draw, draw_mask
from droppath._engine.ops import (
    Branch,
    add,
    eager,
    host_side,
    is_channels_last,
    keep_mask,
    promoted,
    scatter_add,
    skip,
    split,
)
from droppath._engine.spec import DropSpec, masks


@host_side
def run(fn: Branch | None, x: Tensor, dim: int) -> Tensor:
    """``fn(x)`` (``x`` if ``fn`` is None), called from a host-side step.

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


class Subset(NamedTuple):
    """The rows a step ran the branch on: ``idx``, the kept ones, along ``dim``; ``inputs``, the
    input at the rows run (the kept ones first, then the fillers that ``draw_rows`` adds)."""

    idx: Tensor
    dim: int
    inputs: Tensor


class Combine(Protocol):
    """How a kept branch output joins the base of the step (see ``Sum``)."""

    def whole(self, base: Tensor, out: Tensor, scale: float) -> Tensor:
        """Every row kept: ``out`` is the branch's output on all of them."""

    def subset(self, base: Tensor, out: Tensor, rows: Subset, scale: float) -> Tensor:
        """Some rows kept: ``out`` is the branch's output on ``rows.inputs``."""

    def masked(self, base: Tensor, out: Tensor, mask: Tensor) -> Tensor:
        """Some rows kept, the branch run on every row: ``mask`` is ``scale`` at the kept rows
        and 0 at the others, shaped to broadcast against ``out``."""


@dataclass(frozen=True)
class Sum:
    """A residual's combination: ``base + scale * out`` at the kept rows.

    The sum is in ``base``'s memory format, or with ``branch_layout`` in the branch output's when
    it is channels_last (as ``branch + base`` gives, e.g. after a permute), so that a rewritten
    block returns what its original returned and the next block runs the same kernels.
    """

    branch_layout: bool = False

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


SUM = Sum()


@host_side
def skip_add(
    x: Tensor,
    branch: Branch,
    spec: DropSpec,
    *,
    shortcut: Branch | None = None,
    generator: torch.Generator | None = None,
    combine: Combine = SUM,
) -> Tensor:
    """A training step that skips the dropped work: ``shortcut(x) + drop_path(branch(x))``.

    Batch mode draws one decision and calls ``branch`` only when it keeps the step; row mode draws
    one decision per sample along ``spec.batch_dim`` and calls ``branch`` on the kept samples
    only (see ``droppath.drop_add_residual``). ``combine`` joins the kept output to the base
    (default: the residual sum). ``x`` must have been checked (a floating tensor with the batch
    dimension); a branch with an ``at_rows(run, dim)`` method gives the branch for those rows
    (a derived branch, whose per-sample side inputs are gathered too).

    With ``spec.strategy`` ``"auto"`` and ``spec.auto``, the site's ``AutoChoice``, row mode
    takes the row subset or the mask from what each costs (``droppath._engine.cost``); with
    ``"mask"`` it takes the mask. Either way the draws are the same host-side draws.

    Under torch.compile this frame runs eagerly, so the rate and the draws never enter a graph (no
    guard on ``p``, no recompilation when a schedule changes it), while ``branch`` and
    ``shortcut`` compile, through ``run``, as graphs of their own, with the batch dimension
    dynamic from the first call: the full batch and every subset size share one graph.
    """
    dim = spec.batch_dim % x.dim()
    clock, auto = None, spec.auto
    if auto is not None and spec.strategy == "auto" and spec.mode == "row":
        clock = auto.begin(x, dim, spec.p)
    if masks(spec.mode, spec.strategy, auto):
        return _masked_step(x, branch, spec, shortcut, generator, combine)
    kept = draw(spec, x.shape[dim], x.device, generator, branch=branch)
    if kept is False:
        return skip(run(shortcut, x, dim), branch)
    if kept is True:
        base = run(shortcut, x, dim)
        return combine.whole(base, _timed(branch, x, dim, auto, clock), spec.scale)
    idx, to_run = kept
    # one node hands x to the shortcut path and the rows to run to the branch
    x_all, inputs = split(x, to_run, dim)
    at_rows = getattr(branch, "at_rows", None)
    if at_rows is not None:
        branch = at_rows(to_run, dim)
    base, out = run(shortcut, x_all, dim), _timed(branch, inputs, dim, auto, clock)
    return combine.subset(base, out, Subset(idx, dim, inputs), spec.scale)


@host_side
def _timed(
    branch: Branch, x: Tensor, dim: int, auto: AutoChoice | None, clock: Clock | None
) -> Tensor:
    """``run(branch, x, dim)``, timed by ``clock`` for ``auto`` when there is one."""
    if clock is None or auto is None:
        return run(branch, x, dim)
    out = run(branch, x, dim)
    auto.timed(clock, x.shape[dim])
    return out


@host_side
def _masked_step(
    x: Tensor,
    branch: Branch,
    spec: DropSpec,
    shortcut: Branch | None,
    generator: torch.Generator | None,
    combine: Combine,
) -> Tensor:
    """A row step that masks: the branch on every row, the dropped ones multiplied by 0, with
    the decisions drawn on the host as the subset draws them."""
    dim = spec.batch_dim % x.dim()
    mask = draw_mask(spec, x.shape[dim], x.device, generator, branch=branch)
    if mask is False:
        return skip(run(shortcut, x, dim), branch)
    base, out = run(shortcut, x, dim), run(branch, x, dim)
    if mask is True:
        return combine.whole(base, out, spec.scale)
    out_dim = dim if out.dim() == x.dim() else spec.batch_dim % out.dim()
    shape = [1] * out.dim()
    shape[out_dim] = out.shape[out_dim]
    return combine.masked(base, out, mask.view(shape))


def mask_add(
    x: Tensor,
    branch: Branch,
    spec: DropSpec,
    *,
    shortcut: Branch | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A training step that masks: ``branch`` runs on every sample and the drop is fused into the
    add (``torch.addcmul``), with the mask drawn on ``x``'s device (with ``generator`` when it
    lives there). It compiles into one graph with the branch."""
    dim = spec.batch_dim % x.dim()
    base = x if shortcut is None else shortcut(x)
    if spec.p == 0.0:
        return base + branch(x)
    if spec.p == 1.0:
        return skip(base, branch)
    base, out = promoted(base, branch(x))
    out_dim = dim if out.dim() == x.dim() else spec.batch_dim % out.dim()
    device_gen = generator if generator is not None and generator.device == out.device else None
    mask = keep_mask(
        out,
        spec.p,
        mode="row",
        batch_dim=out_dim,
        scale_by_keep=spec.scale_by_keep,
        generator=device_gen,
    )
    return torch.addcmul(base, out, mask)
