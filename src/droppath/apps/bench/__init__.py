"""``droppath bench``: the time and memory of a training step, drop path variants side by side.

Every variant trains the same stack (same weights, same input) and the variants are interleaved
in one process, in a rotating order, after warm-up; the table shows medians and ratios to the
plain residual (no drop path at all).

One module per concern: ``config`` (what to time),
``baselines`` (what droppath is compared with),
``models`` and ``library_models`` (the models),
``variants`` (the variants and the rewriting),
``timing`` (interleaved timing, memory),
``run`` (``run_bench``) and ``report``
(the table, the JSON).
"""

from __future__ import annotations

from droppath.apps.bench.baselines import (
    MaskMultiplyResidual,
    PlainResidual,
    TorchtuneLayerDropout,
)
from droppath.apps.bench.config import KINDS, LIBRARIES, BenchConfig, check_device
from droppath.apps.bench.library_models import build_library_model
from droppath.apps.bench.report import format_table, machine_info, write_json
from droppath.apps.bench.run import run_bench
from droppath.apps.bench.timing import check_memory, estimate_step_bytes
from droppath.apps.bench.variants import Variant, variants

__all__ = [
    "KINDS",
    "LIBRARIES",
    "BenchConfig",
    "MaskMultiplyResidual",
    "PlainResidual",
    "TorchtuneLayerDropout",
    "Variant",
    "build_library_model",
    "check_device",
    "check_memory",
    "estimate_step_bytes",
    "format_table",
    "machine_info",
    "run_bench",
    "variants",
    "write_json",
]
