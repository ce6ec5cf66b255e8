"""Record droppath's random decisions in each process of a distributed run, and replay them in a
single-process reference that runs the global batch.

Every decision of droppath's host-side steps goes through two functions of
``droppath._engine.draws``: ``draw_kept(n, keep, generator=None)``, a bool per row, and
``draw_gate(keep, *, generator=None)``, one bool for a batch-mode step. ``recording()`` wraps
both, wherever a module of droppath holds them (some import them by name), and keeps what each
call returned, in call order. ``replaying(per_rank)`` answers the reference's calls from the
records of the ranks: a row draw over the global batch gets the ranks' vectors concatenated in
rank order, a gate gets the ranks' gate, which must be the same on every rank.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from droppath._engine import draws

# One record: ("kept", keep, bool tensor) or ("gate", keep, bool).
Record = tuple[str, float, Any]

_ORIGINAL_KEPT = draws.draw_kept
_ORIGINAL_GATE = draws.draw_gate


@contextmanager
def _patched(kept: Callable[..., Tensor], gate: Callable[..., bool]) -> Iterator[None]:
    """``kept`` and ``gate`` in place of the two draws, in every loaded module of droppath that
    holds them (found by identity, so a new import by name is found too)."""
    replaced: list[tuple[Any, str, Any]] = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "droppath" or name.startswith("droppath.")):
            continue
        for attr, value in list(vars(module).items()):
            new = kept if value is _ORIGINAL_KEPT else gate if value is _ORIGINAL_GATE else None
            if new is not None:
                replaced.append((module, attr, value))
                setattr(module, attr, new)
    found = {value for _, _, value in replaced}
    assert found == {_ORIGINAL_KEPT, _ORIGINAL_GATE}, "droppath's draws were not found"
    try:
        yield
    finally:
        for module, attr, value in replaced:
            setattr(module, attr, value)


@contextmanager
def recording() -> Iterator[list[Record]]:
    """Keep every decision droppath draws in this process, in call order, in the yielded list."""
    records: list[Record] = []

    @torch.compiler.disable
    def kept(n: int, keep: float, *args: Any, **kwargs: Any) -> Tensor:
        out = _ORIGINAL_KEPT(n, keep, *args, **kwargs)
        records.append(("kept", float(keep), out.clone()))
        return out

    @torch.compiler.disable
    def gate(keep: float, *args: Any, **kwargs: Any) -> bool:
        out = _ORIGINAL_GATE(keep, *args, **kwargs)
        records.append(("gate", float(keep), bool(out)))
        return out

    with _patched(kept, gate):
        yield records


class Replay:
    """The ranks' records, answered call by call to a reference that runs the global batch."""

    def __init__(self, per_rank: list[list[Record]]) -> None:
        self.queues = [deque(records) for records in per_rank]
        self.calls = 0

    def _next(self, kind: str, keep: float) -> list[Any]:
        self.calls += 1
        values = []
        for rank, queue in enumerate(self.queues):
            if not queue:
                raise AssertionError(
                    f"reference draw {self.calls} ({kind}): rank {rank} recorded no more draws"
                )
            got, got_keep, value = queue.popleft()
            if got != kind or abs(got_keep - keep) > 1e-12:
                raise AssertionError(
                    f"reference draw {self.calls} is {kind} at keep {keep}, rank {rank}'s is "
                    f"{got} at keep {got_keep}: the reference makes other draws than the ranks"
                )
            values.append(value)
        return values

    def kept(self, n: int, keep: float, *args: Any, **kwargs: Any) -> Tensor:
        out = torch.cat(self._next("kept", keep))
        if out.shape[0] != n:
            raise AssertionError(
                f"reference draw {self.calls} is for {n} rows, the ranks' for "
                f"{out.shape[0]}: not the global batch"
            )
        return out

    def gate(self, keep: float, *args: Any, **kwargs: Any) -> bool:
        values = self._next("gate", keep)
        if len(set(values)) != 1:
            raise AssertionError(
                f"batch-mode gate {self.calls} differs across ranks: {values} (each rank "
                "trained a different model)"
            )
        return bool(values[0])

    def left(self) -> list[int]:
        """How many records of each rank the reference has not used."""
        return [len(q) for q in self.queues]


@contextmanager
def replaying(per_rank: list[list[Record]]) -> Iterator[Replay]:
    """Answer droppath's draws in this process from the records of the ranks (rank order)."""
    replay = Replay(per_rank)
    with _patched(torch.compiler.disable(replay.kept), torch.compiler.disable(replay.gate)):
        yield replay
