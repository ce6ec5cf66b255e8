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

import importlib
from typing import TYPE_CHECKING, Any

# The names load on first use (PEP 562), so that ``droppath train --help`` reads ``config``
# without importing torch, which ``run`` and ``compare`` need.
_EXPORTS = {
    "Run": "droppath.apps.train.run",
    "TrainConfig": "droppath.apps.train.config",
    "format_results": "droppath.apps.train.compare",
    "train": "droppath.apps.train.compare",
}

__all__ = ["Run", "TrainConfig", "format_results", "train"]

if TYPE_CHECKING:
    from droppath.apps.train.compare import format_results, train
    from droppath.apps.train.config import TrainConfig
    from droppath.apps.train.run import Run


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'droppath.apps.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
