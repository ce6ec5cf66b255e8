"""The random decisions of a skipping step, drawn on the host.

Decisions are drawn from the CPU generator (``generator`` when it is a CPU generator, else the
global one): no device synchronization and exact replay under ``torch.utils.checkpoint``, which
restores the CPU random state for recomputation. In a process group of more than one rank, row
decisions are independent across ranks and batch-mode gates identical, whatever the ranks were
seeded with (``droppath._engine.ranks``). ``draw_kept`` and ``draw_gate`` are the only two draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from droppath._engine.ops import eager
from droppath._engine.ranks import communicates, group, rank_rows, shared_gate
from droppath._engine.spec import DropSpec

# What ``draw`` returns: True (every row kept), False (every row dropped), or the indices of the
# kept rows and those of the rows to run (the kept ones, then fillers).
Kept = bool | tuple[Tensor, Tensor]
# What makes a step's decisions instead of ``draw``: ``decide(n, device, branch)``, a ``Kept``
# (see ``forced``).
Decide = Callable[[int, torch.device, Any], Kept]


def _host_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """The generator for decisions made on the host: ``generator`` if it lives on the CPU."""
    if generator is not None and generator.device.type == "cpu":
        return generator
    return None


def draw_kept(n: int, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """An independent Bernoulli(``keep``) decision per row of ``n``, on the host: the one draw
    behind ``draw_rows``, ``draw_mask`` and the decisions drawn ahead (``predraw``). In a process
    group, this rank's own (``droppath._engine.ranks.rank_rows``)."""
    source = _host_generator(generator)
    ranks = group()
    if ranks is not None:
        return rank_rows(n, keep, ranks[0], source)
    return torch.rand(n, generator=source) < keep


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t``, drawn on the host, on ``device`` without waiting for it (through pinned memory to
    a GPU)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@eager
def draw_gate(keep: float, *, generator: torch.Generator | None = None) -> bool:
    """One Bernoulli(keep) decision for batch mode, drawn on the host.

    The draw never waits for an accelerator; in a process group it is the same on every rank,
    however the ranks were seeded, with no collective (``droppath._engine.ranks.shared_gate``).
    """
    source = _host_generator(generator)
    ranks = group()
    if ranks is not None:
        return shared_gate(keep, ranks[0], source)
    return bool(torch.rand((), generator=source) < keep)


@eager
def draw_rows(
    n: int,
    keep: float,
    device: torch.device,
    *,
    generator: torch.Generator | None = None,
    bucket: int | None = None,
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
    return rows_of(draw_kept(n, keep, generator), device, bucket)


def rows_of(kept: Tensor, device: torch.device, bucket: int | None = None) -> tuple[Tensor, Tensor]:
    """``draw_rows``'s result for the host-side decisions ``kept`` (a bool per row)."""
    n = kept.shape[0]
    idx = kept.nonzero().squeeze(1)
    run = idx
    k = idx.shape[0]
    if 0 < k < n:
        size = max(2, k if bucket is None else min(n, -(-k // bucket) * bucket))
        if size > k:
            run = torch.cat([idx, (~kept).nonzero().squeeze(1)[: size - k]])
    if device.type == "cpu":
        return idx, run
    both = to_device(torch.cat([idx, run]), device)
    return both[:k], both[k:]


def must_call(branch: Any) -> bool:
    """Whether a step must call ``branch`` even where it keeps no sample of this rank: in a
    process group, a branch that communicates (``droppath._engine.ranks.communicates``)."""
    return group() is not None and communicates(branch)


@eager
def draw(
    spec: DropSpec,
    n: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    *,
    branch: Any = None,
) -> Kept:
    """What a training step of ``spec`` keeps of ``n`` samples: True (all of them), False (none),
    or ``(kept, run)`` from ``draw_rows``. A rate of 0 or 1 draws nothing.

    In row mode, where this rank keeps none of its samples but ``branch`` must be called all the
    same (``must_call``), the result is ``(no rows, fillers)``: the branch runs on filler rows
    weighted 0, in step with the other ranks' collectives. Batch-mode gates agree across ranks,
    so a dropped gate is skipped on every rank alike."""
    if spec.p == 0.0:
        return True
    if spec.p == 1.0:
        return False
    keep = 1.0 - spec.p
    if spec.mode == "batch":
        return draw_gate(keep, generator=generator)
    idx, run = draw_rows(n, keep, device, generator=generator, bucket=spec.bucket)
    k = idx.shape[0]
    if k == 0:
        return _fillers(idx, n, device) if n > 0 and must_call(branch) else False
    if k == n:
        return True
    return idx, run


def _fillers(idx: Tensor, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(idx, fillers)`` for a draw that kept none of ``n`` rows: the first two rows (one where
    there is one) to run, weighted 0, since no row is kept."""
    return idx, to_device(torch.arange(min(2, n)), device)


@eager
def draw_mask(
    spec: DropSpec,
    n: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    *,
    branch: Any = None,
) -> bool | Tensor:
    """``draw``'s decisions as a mask: True (every row kept), False (none), or a float32 tensor
    of ``n`` values on ``device``, ``spec.scale`` at the kept rows and 0 at the others. The same
    host-side draw as ``draw_rows`` (the same decisions from the same random state), for a row
    step that masks instead of taking the subset. Where no row is kept but ``branch`` must be
    called (``must_call``), a mask of zeros: the branch runs, weighted 0."""
    if spec.p == 0.0:
        return True
    if spec.p == 1.0:
        return False
    kept = draw_kept(n, 1.0 - spec.p, generator)
    k = int(kept.sum())
    if k == 0 and not (n > 0 and must_call(branch)):
        return False
    if k == n:
        return True
    return to_device(kept.to(torch.float32).mul_(spec.scale), device)


@eager
def forced(
    kept: Tensor, device: torch.device, bucket: int | None = None, *, branch: Any = None
) -> Kept:
    """``draw``'s result for decisions given rather than drawn (``kept``, a bool per row, on the
    host): the check of an accelerated block forces them, and runs the step training runs."""
    n, k = kept.shape[0], int(kept.sum())
    if k == n:
        return True
    if k == 0:
        return _fillers(kept.nonzero().squeeze(1), n, device) if must_call(branch) else False
    return rows_of(kept, device, bucket)
