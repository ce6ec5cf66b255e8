"""Two versions of droppath in one process, interleaved step by step: the README's rows.

    git worktree add /tmp/old COMMIT
    python benchmarks/versions_inprocess.py /tmp/old/src [--reps 20] [--rows mlp-row ...]

The other version's package is copied to a temporary folder as ``droppath_old`` (its imports
renamed), so that both import side by side. For each README row, each version builds the row's
model with its own ``droppath bench`` code (``build_model``, ``variant_model``: droppath's own
way, as the README row times it) from the same seed, so both have the same weights; then their
training steps (forward, loss, backward, as the bench's) alternate, each pair from the same seed,
so both draw the same decisions. Prints per row the median step of each and the median of the
paired ratios new / old (below 1: this checkout is faster). One process, one machine state: this
compares the versions' code and nothing else. Needs the real-library environment.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROWS: dict[str, dict[str, Any]] = {
    "vit_small": {"model": "timm:vit_small_patch16_224", "image": 96, "batch": 32},
    "dinov3_vit": {"model": "transformers:dinov3_vit", "image": 96, "batch": 32},
    "convnext_tiny": {"model": "timm:convnext_tiny", "image": 64, "batch": 16},
    "llama": {"kind": "llama", "rule": "uniform"},
    "mlp-row": {
        "kind": "mlp",
        "batch": 64,
        "tokens": 32,
        "width": 192,
        "depth": 12,
        "rule": "linear",
    },
    "resnet110-batch": {
        "kind": "conv",
        "batch": 32,
        "depth": 54,
        "rule": "linear",
        "mode": "batch",
    },
}


def _renamed_copy(src: Path) -> Path:
    """``src/droppath`` copied as ``droppath_old`` under a new folder (returned), its imports
    renamed."""
    root = Path(tempfile.mkdtemp(prefix="droppath_old_"))
    shutil.copytree(src / "droppath", root / "droppath_old")
    for path in (root / "droppath_old").rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bdroppath([.:])", r"droppath_old\1", text)
        text = re.sub(r"^(from|import) droppath\b", r"\1 droppath_old", text, flags=re.M)
        text = text.replace('"droppath.', '"droppath_old.')
        path.write_text(text)
    return root


def _build(lib: str, row: dict[str, Any]) -> tuple[torch.nn.Module, torch.Tensor, Any]:
    config: ModuleType = importlib.import_module(f"{lib}.apps.bench.config")
    models: ModuleType = importlib.import_module(f"{lib}.apps.bench.models")
    variants: ModuleType = importlib.import_module(f"{lib}.apps.bench.variants")
    timing: ModuleType = importlib.import_module(f"{lib}.apps.bench.timing")
    cfg = config.BenchConfig(p=0.5, **row)
    torch.manual_seed(0)
    model, x = models.build_model(cfg)
    kind = "model" if cfg.model else cfg.kind
    ours = next(
        v
        for v in variants.variants(cfg.mode or "row", kind=kind)
        if v.kind in ("accelerate", "layer_drop") or (v.kind == "residual" and v.strategy == "auto")
    )
    rates = None
    if kind == "llama":
        rates = importlib.import_module(f"{lib}.rates").depth_rates(cfg.depth or 8, 0.5, "uniform")
    return variants.variant_model(model, ours, rates).train(), x, timing._step


def _step(built: tuple[torch.nn.Module, torch.Tensor, Any], seed: int) -> float:
    """One training step of a built row, its draws from ``seed``: its seconds."""
    model, x, run = built
    torch.manual_seed(seed)
    t = time.perf_counter()
    run(model, x)
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("old", help="the other version's src folder")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    args = parser.parse_args()
    sys.path.insert(0, str(_renamed_copy(Path(args.old))))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.reps} reps")
    for row in args.rows:
        built = {
            name: _build(lib, ROWS[row])
            for name, lib in (("old", "droppath_old"), ("new", "droppath"))
        }

        for i in range(3):  # warm-up, and each version's checks and auto measurements
            for name in built:
                _step(built[name], i)
        times: dict[str, list[float]] = {name: [] for name in built}
        for i in range(args.reps):
            for name in list(built) if i % 2 == 0 else list(reversed(built)):
                times[name].append(_step(built[name], 1000 + i))
        ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"], strict=True))
        ms = {name: round(1000 * statistics.median(t), 1) for name, t in times.items()}
        print(
            f"{row:16s} old {ms['old']:8.1f} ms  new {ms['new']:8.1f} ms  new/old {ratio:.3f}  "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        del built
    return 0


if __name__ == "__main__":
    sys.exit(main())
