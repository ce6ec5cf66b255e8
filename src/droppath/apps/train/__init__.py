"""``droppath train``: train a reference model, with and without stochastic depth, and compare.

One process, or several under ``torchrun --nproc_per_node=N`` (DistributedDataParallel over gloo
on CPUs, NCCL on GPUs, with a DistributedSampler); only rank 0 prints and writes.

One module per concern: :mod:`~droppath.apps.train.config` (what to train),
:mod:`~droppath.apps.train.distributed` (the processes), :mod:`~droppath.apps.train.run` (one
model in training), :mod:`~droppath.apps.train.checkpointing` (atomic files, Ctrl-C),
:mod:`~droppath.apps.train.plotting` and :mod:`~droppath.apps.train.compare` (the runs side by
side: :func:`train`).
"""

from __future__ import annotations

from droppath.apps.train.compare import format_results, train
from droppath.apps.train.config import TrainConfig
from droppath.apps.train.run import Run

__all__ = ["Run", "TrainConfig", "format_results", "train"]
