"""The training step of a drop-path site: ``skip_add`` skips the dropped work, ``mask_add``
masks it, ``ahead_add`` reads decisions drawn ahead. ``Residual``, ``drop_add_residual``,
``LayerDrop`` and the forwards that ``accelerate`` derives all take their step here, with the
combination that puts their kept output back (``droppath._engine.combine``); which of the two a
site takes is ``DropSpec.skips``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from droppath._engine.ahead import Drawn, ahead_rows
from droppath._engine.combine import SUM, Combine, Subset
from droppath._engine.cost import AutoChoice, Clock
from droppath._engine.draws import Decide, draw, draw_mask
from droppath._engine.ops import Branch, eager, host_side, keep_mask, promoted, skip, split
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


@host_side
def skip_add(
    x: Tensor,
    branch: Branch,
    spec: DropSpec,
    *,
    shortcut: Branch | None = None,
    source: torch.Generator | Decide | None = None,
    combine: Combine = SUM,
) -> Tensor:
    """A training step that skips the dropped work: ``shortcut(x) + drop_path(branch(x))``.

    Batch mode draws one decision and calls ``branch`` only when it keeps the step; row mode draws
    one decision per sample along ``spec.batch_dim`` and calls ``branch`` on the kept samples
    only (see ``droppath.drop_add_residual``). ``combine`` joins the kept output to the base
    (default: the residual sum; ``droppath._engine.combine``). ``x`` must have been checked (a
    floating tensor with the batch dimension); a branch with an ``at_rows(run, dim)`` method gives
    the branch for those rows (a derived branch, whose per-sample side inputs are gathered too).
    ``source`` gives the decisions: draws from the global random state (None) or from a
    ``torch.Generator``, or a function ``decide(n, device, branch)`` that makes them (the check
    of an accelerated block forces them so), so that the check runs this very step.

    With ``spec.strategy`` ``"auto"`` and ``spec.auto``, the site's ``AutoChoice``, row mode
    takes the row subset or the mask from what each costs (``droppath._engine.cost``); with
    ``"mask"`` it takes the mask. Either way the draws are the same host-side draws.

    Under torch.compile this frame runs eagerly, so the rate and the draws never enter a graph (no
    guard on ``p``, no recompilation when a schedule changes it), while ``branch`` and
    ``shortcut`` compile as graphs of their own, with the batch dimension dynamic from the first
    call: the full batch and every subset size share one graph. The branch is called from this
    frame (``_callee`` only says what to call), so no frame of the engine's sits between the step
    and the branch's own code.
    """
    dim = spec.batch_dim % x.dim()
    clock, auto = None, spec.auto
    generator: torch.Generator | None = None
    decide: Decide | None = None
    if isinstance(source, torch.Generator):
        generator = source
    elif source is not None:
        decide = source
    if decide is None and combine.may_mask:
        if auto is not None and spec.strategy == "auto" and spec.mode == "row":
            clock = auto.begin(x, dim, spec.p)
        if masks(spec.mode, spec.strategy, auto):
            return _masked_step(x, branch, spec, shortcut, generator, combine)
    n = x.shape[dim]
    if decide is None:
        kept = draw(spec, n, x.device, generator, branch=branch)
    else:
        kept = decide(n, x.device, branch)
    if kept is False:
        return combine.dropped(run(shortcut, x, dim), branch)
    if kept is True:
        base = run(shortcut, x, dim)
        fn, args, kwargs = _callee(branch, x, dim)
        out = _finished(branch, fn(*args, **kwargs), auto, clock, n)
        return combine.whole(base, out, spec.scale)
    idx, to_run = kept
    # one node hands x to the shortcut path and the rows to run to the branch
    x_all, inputs = split(x, to_run, dim) if combine.takes_rows else (x, None)
    at_rows = getattr(branch, "at_rows", None)
    if at_rows is not None:
        branch = at_rows(to_run, dim)
    base = run(shortcut, x_all, dim)
    fn, args, kwargs = _callee(branch, inputs, dim)
    out = _finished(branch, fn(*args, **kwargs), auto, clock, to_run.shape[0])
    return combine.subset(base, out, Subset(idx, dim, inputs), spec.scale)


_NO_KWARGS: dict[str, Any] = {}


@eager
def _callee(
    branch: Branch, x: Tensor | None, dim: int
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """What the step calls for ``branch(x)``: ``x`` marked dynamic along ``dim`` first. A
    branch with ``direct(x)`` (a derived one) says itself what to call, its own code, which
    compiles as a frame of its own; any other is called through ``_compiled_call``."""
    if x is not None:
        x = x.view_as(x)  # mark an alias, never the caller's tensor
        torch._dynamo.maybe_mark_dynamic(x, dim)
    direct = getattr(branch, "direct", None)
    if direct is not None:
        called: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] = direct(x)
        return called
    return _compiled_call, (branch, x), _NO_KWARGS


@eager
def _finished(
    branch: Branch, out: Any, auto: AutoChoice | None, clock: Clock | None, rows: int
) -> Tensor:
    """The branch's output as the combination takes it (a derived branch's ``finish`` keeps
    what it returns beside it), the call timed for ``strategy="auto"`` when it is measured."""
    finish = getattr(branch, "finish", None)
    if finish is not None:
        out = finish(out)
    if clock is not None and auto is not None:
        auto.timed(clock, rows)
    result: Tensor = out
    return result


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
    base = run(shortcut, x, dim)
    fn, args, kwargs = _callee(branch, x, dim)  # as the subset calls it: the same graphs
    out = _finished(branch, fn(*args, **kwargs), None, None, x.shape[dim])
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


def ahead_add(
    x: Tensor,
    branch: Branch,
    drawn: Drawn,
    dim: int,
    shortcut: Branch | None = None,
    combine: Combine = SUM,
) -> Tensor:
    """``shortcut(x) + drop_path(branch(x))`` under the decisions ``drawn``: the branch runs on
    ``drawn.run``'s rows, and its output, times each kept row's scale, is put back at them by
    ``combine``'s drawn-ahead form.

    Every tensor operation is traceable and a gather, forward and backward: under torch.compile
    the step is part of the model's graph, the gathers fused with the branch's own operations."""
    base = x if shortcut is None else shortcut(x)
    return combine.ahead(base, branch(ahead_rows(x, drawn, dim)), drawn, dim)
