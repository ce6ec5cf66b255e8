"""The processes of a training: one, or several under ``torchrun --nproc_per_node=N``
(DistributedDataParallel over gloo on CPUs, NCCL on GPUs); only rank 0 prints and writes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

__all__ = ["Dist", "destroy_distributed", "init_distributed"]


@dataclass
class Dist:
    """This process's place: its rank, the number of processes, its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE``, ``LOCAL_RANK``), or
    run alone on the GPU if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def destroy_distributed(dist: Dist) -> None:
    """Leave the process group, once the caller has dropped its DDP wrappers: they (and their
    reducers) are freed first, while the group still lives, so that its destructor does not run
    later from theirs, at interpreter teardown."""
    if dist.world <= 1:
        return
    import gc

    import torch.distributed as tdist

    gc.collect()
    tdist.destroy_process_group()
