"""``droppath train``: train a reference model, with and without stochastic depth, and compare.

One process, or several under ``torchrun --nproc_per_node=N`` (DistributedDataParallel over gloo
on CPUs, NCCL on GPUs, with a DistributedSampler); only rank 0 prints and writes.

One module per concern: ``config`` (what to train),
``distributed`` (the processes), ``run`` (one
model in training), ``checkpointing`` (atomic files, Ctrl-C),
``plotting`` and ``compare`` (the runs side by
side: ``train``).
"""

from __future__ import annotations

from droppath.apps.train.compare import format_results, train
from droppath.apps.train.config import TrainConfig
from droppath.apps.train.run import Run

__all__ = ["Run", "TrainConfig", "format_results", "train"]
