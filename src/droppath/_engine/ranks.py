"""Decisions across the ranks of a process group, right by construction.

In a process group of more than one rank (DDP, FSDP, ``torchrun``), whatever the user seeds:

- **Row decisions are independent across ranks.** A row draw takes one 63-bit number from the
  source generator (the global CPU one, or ``generator=``) and draws the rows from a generator
  seeded with that number and the rank. Ranks seeded alike so keep different samples, ranks seeded
  apart too; ``torch.utils.checkpoint``, which restores the source's state for recomputation,
  replays the same rows, and restoring the source's state on resume restores them.
- **Batch-mode gates are identical across ranks.** A gate comes from droppath's own gate stream,
  a CPU generator seeded once per process group from rank 0's ``torch.initial_seed()`` (handed to
  the other ranks through the process group's store when the first gate is drawn: no collective
  on the backend, none per step). Every rank draws the same gates in the same order, since every
  rank runs the same model. A gate still takes one number from the source generator: during a
  backward pass (checkpointing's recomputation) a gate whose number was seen in the forward is
  replayed, not drawn again. ``get_rng_state``/``set_rng_state`` save and restore the stream.
- **A branch that communicates is never skipped by one rank alone** (``communicates``): where a
  rank keeps none of its rows, the branch runs on filler rows weighted 0, so that its collectives
  (``SyncBatchNorm``, FSDP's all-gathers and reduce-scatters) stay in step with the ranks that
  kept some.

Without a process group, or in a group of one, decisions come from the source generator as
they always did.
"""

from __future__ import annotations

import datetime
import functools
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "communicates",
    "get_rng_state",
    "group",
    "rank_rows",
    "set_rng_state",
    "sharded_inside",
    "shared_gate",
]

_MASK63 = (1 << 63) - 1
_REPLAYS = 4096  # the gates remembered for replay in a backward pass


def group() -> tuple[int, int] | None:
    """``(rank, world size)`` of the default process group, or None without one (or in a
    group of one)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None


def _mix(seed: int, rank: int) -> int:
    """A 63-bit seed from ``seed`` and ``rank`` (splitmix64's finalizer): nearby inputs give
    unrelated seeds."""
    z = (seed + 0x9E3779B97F4A7C15 * (rank + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK63


def _number(source: torch.Generator | None) -> int:
    """One 63-bit number from the source generator (the global CPU one with None)."""
    return int(torch.randint(0, _MASK63, (), generator=source))


_ROWS = torch.Generator()  # reseeded at every row draw in a group


def rank_rows(n: int, keep: float, rank: int, source: torch.Generator | None) -> Tensor:
    """``n`` independent Bernoulli(``keep``) row decisions of this rank: the same for the same
    source state and rank, independent across ranks."""
    _ROWS.manual_seed(_mix(_number(source), rank))
    return torch.rand(n, generator=_ROWS) < keep


@dataclass
class _Stream:
    """The gate stream of one process group: its seed, generator, and the gates drawn in
    forward passes, by their source number, for replay in a backward pass."""

    token: Any
    seed: int
    generator: torch.Generator
    seen: OrderedDict[int, bool] = field(default_factory=OrderedDict)


_STREAM: list[_Stream | None] = [None]
_SEEDINGS = [0]  # the streams this process has seeded: the store key of the next one


def _default_group() -> Any:
    """The default process group: a new one is a new run of the stream. A stream holds it by a
    weak reference, so that it never keeps a destroyed group alive (its destructor at exit
    aborts the process)."""
    return torch.distributed.distributed_c10d._get_default_group()


_WAIT = datetime.timedelta(minutes=5)  # for rank 0's seed, before saying why it has not come


def _shared_seed(rank: int) -> int:
    """Rank 0's ``torch.initial_seed()``, handed to every rank through the default store: set by
    rank 0 when it first draws a gate (or calls ``get_rng_state``), waited for by the others."""
    key = f"droppath/gate-seed/{_SEEDINGS[0]}"
    _SEEDINGS[0] += 1
    store = torch.distributed.distributed_c10d._get_default_store()
    if rank == 0:
        store.set(key, str(torch.initial_seed() & _MASK63))
    else:
        try:
            store.wait([key], _WAIT)
        except RuntimeError as error:  # a timeout: rank 0 never drew a gate
            raise RuntimeError(
                f"droppath: rank {rank} draws a batch-mode gate, but rank 0 has not drawn one in "
                f"{_WAIT.seconds // 60} minutes (it holds no batch-mode site, in a pipeline, "
                "say); call droppath.get_rng_state() on every rank once the process group is "
                "initialized"
            ) from error
    return int(store.get(key).decode())


def _stream(rank: int) -> _Stream:
    stream, current = _STREAM[0], _default_group()
    if stream is None or stream.token() is not current:
        seed = _shared_seed(rank)
        stream = _Stream(weakref.ref(current), seed, torch.Generator().manual_seed(seed))
        _STREAM[0] = stream
    return stream


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and int(task()) != -1


def shared_gate(keep: float, rank: int, source: torch.Generator | None) -> bool:
    """One Bernoulli(``keep``) gate, the same on every rank (see the module's docstring)."""
    number = _number(source)
    stream = _stream(rank)
    if _in_backward() and number in stream.seen:  # recomputation: the forward's gate
        return stream.seen[number]
    kept = bool(torch.rand((), generator=stream.generator) < keep)
    stream.seen[number] = kept
    if len(stream.seen) > _REPLAYS:
        stream.seen.popitem(last=False)
    return kept


def get_rng_state() -> dict[str, Any]:
    """The state of droppath's gate stream in this process group; ``{}`` outside a group of
    more than one rank, where batch-mode gates come from torch's CPU generator.

    Save it beside ``torch.get_rng_state()`` in a checkpoint (from any rank: every rank's is the
    same) and give it to ``set_rng_state`` on every rank when resuming: the run then draws the
    same gates as one that never stopped. Row decisions need nothing beyond the CPU random state.

    Examples:
        >>> import droppath
        >>> droppath.get_rng_state()  # no process group: the gates come from torch's generator
        {}
    """
    found = group()
    if found is None:
        return {}
    stream = _stream(found[0])
    return {"seed": stream.seed, "generator": stream.generator.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore droppath's gate stream from ``get_rng_state()`` (call it on every rank, after
    the process group is initialized). An empty state does nothing.

    Args:
        state: what ``get_rng_state`` returned.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict from droppath.get_rng_state(), got {state!r}")
    if not state:
        return
    if group() is None:
        raise RuntimeError(
            "droppath.set_rng_state: the gate stream exists in a process group of more than one "
            "rank; initialize the process group first"
        )
    generator = torch.Generator()
    generator.set_state(state["generator"])
    _STREAM[0] = _Stream(weakref.ref(_default_group()), int(state["seed"]), generator)


def _modules(branch: Any) -> list[nn.Module]:
    if isinstance(branch, nn.Module):
        return list(branch.modules())
    found = getattr(branch, "modules", None)
    return list(found()) if callable(found) else []


@functools.cache
def _fsdp_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        classes.append(FullyShardedDataParallel)
        from torch.distributed.fsdp import FSDPModule  # torch 2.6 and later

        classes.append(FSDPModule)
    except ImportError:
        pass
    return tuple(classes)


def _flat_views(module: nn.Module) -> bool:
    """Whether ``module`` holds views of an FSDP flat parameter in place of its own parameters
    (``FullyShardedDataParallel(use_orig_params=False)``: the branch's parameters are plain
    tensors during the forward, whose gradients reach the flat parameter)."""
    return any(
        isinstance(v, Tensor) and v.requires_grad and v._base is not None
        for k, v in vars(module).items()
        if not k.startswith("_")
    )


def sharded_inside(block: nn.Module) -> bool:
    """Whether a module below ``block`` is sharded by FSDP (``fully_shard`` on a branch, say):
    its parameters are gathered by hooks around its own calls and its gradients reduced by
    hooks in the backward pass, so the block cannot be run again and differentiated inside a
    training step (``accelerate``'s check) without upsetting them."""
    fsdp = _fsdp_classes()
    return any(isinstance(m, fsdp) for m in block.modules() if m is not block)


def communicates(branch: Any) -> bool:
    """Whether calling ``branch`` may run a collective that every rank must run alike: it holds
    a ``SyncBatchNorm``, a module sharded by FSDP (``fully_shard``, ``FullyShardedDataParallel``),
    a distributed tensor parameter, a DeepSpeed ZeRO-3 partitioned parameter, or an FSDP flat
    parameter's views. A branch that is not a module stands for its owner's (``modules()``)."""
    fsdp = _fsdp_classes()
    for m in _modules(branch):
        if isinstance(m, (nn.SyncBatchNorm, *fsdp)) or _flat_views(m):
            return True
        own = list(m.parameters(recurse=False))
        # a distributed tensor (FSDP2, tensor parallel), a DeepSpeed ZeRO-3 partition
        if any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in own):
            return True
    return False
