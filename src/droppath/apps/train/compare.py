"""``droppath train``'s work: one run, or with ``compare`` two (with and without stochastic
depth) trained an epoch of each in turn; then the table, the summary, the plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from droppath.apps.train.checkpointing import (
    atomic_write_bytes,
    check_fresh,
    check_writable,
    clear_previous,
)
from droppath.apps.train.config import TrainConfig
from droppath.apps.train.distributed import destroy_distributed, init_distributed
from droppath.apps.train.plotting import plot
from droppath.apps.train.run import Run

__all__ = ["NOISY_SPREAD", "format_results", "summary", "time_spread", "train"]

# Above this spread (``time_spread``) of a run's epoch times, results.md says that the time
# ratio is not supported: the medians it divides could each be off by about that much.
NOISY_SPREAD = 0.10


def time_spread(times: Sequence[float]) -> float:
    """How much a run's epoch times vary: their median absolute deviation over their median
    (0 for fewer than two). Robust, like the median it qualifies: one slow epoch among many
    (a first, compiling epoch) moves neither; times that wander with the machine's load do.

    Examples:
        >>> round(time_spread([2.0, 2.1, 1.9, 2.0, 6.0]), 2)  # one slow epoch: the median holds
        0.05
        >>> round(time_spread([22.0, 30.0, 400.0, 1036.0]), 2)  # a loaded machine
        0.88
    """
    if len(times) < 2:
        return 0.0
    middle = statistics.median(times)
    deviation = statistics.median(abs(t - middle) for t in times)
    return deviation / middle if middle > 0 else 0.0


def summary(run: dict[str, Any]) -> dict[str, float]:
    """A run's result in a few numbers: its last test accuracy, its median time per epoch and
    how much its epoch times vary (``time_spread``)."""
    h = run["history"]
    times = [e["epoch_time_s"] for e in h]
    return {
        "p": run["p"],
        "test_acc": h[-1]["test_acc"] if h else float("nan"),
        "epoch_time_s": statistics.median(times) if times else float("nan"),
        "epoch_time_spread": time_spread(times),
        "expected_depth": run["expected_depth"],
        "blocks": run["sites"],
    }


def _noise_note(runs: list[dict[str, Any]], rows: list[dict[str, float]]) -> str:
    """The sentence under the table when the epoch times are too noisy for the time ratio."""
    noisy = [
        f"{run['label']}'s took {min(times):.3g} s to {max(times):.3g} s (spread "
        f"{s['epoch_time_spread']:.0%})"
        for run, s in zip(runs, rows, strict=True)
        if s["epoch_time_spread"] > NOISY_SPREAD
        for times in [[e["epoch_time_s"] for e in run["history"]]]
    ]
    if len(runs) < 2 or not noisy:
        return ""
    return (
        f"The epoch times are too noisy to support the time ratio: {'; '.join(noisy)}. The "
        f"spread is the median absolute deviation over the median; above {NOISY_SPREAD:.0%} "
        "the medians the ratio divides are uncertain by about as much. Run again on a quieter "
        "machine, or with more epochs."
    )


def format_results(runs: list[dict[str, Any]]) -> str:
    """The runs side by side as a Markdown table; time ratios to the last run, and a note under
    the table when a run's epoch times vary too much to support them (``NOISY_SPREAD``)."""
    rows = [summary(r) for r in runs]
    lines = [
        "| run | p | test accuracy | time per epoch (s, median) | time ratio | expected depth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = rows[-1]["epoch_time_s"]
    for run, s in zip(runs, rows, strict=True):
        depth = (
            f"{s['expected_depth']:.2f} of {s['blocks']} ({s['expected_depth'] / s['blocks']:.3f})"
        )
        lines.append(
            f"| {run['label']} | {s['p']:g} | {s['test_acc']:.4f} | {s['epoch_time_s']:.3f} | "
            f"{s['epoch_time_s'] / base:.3f} | {depth} |"
        )
    note = _noise_note(runs, rows)
    return "\n".join([*lines, "", note] if note else lines)


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Run the training described by ``cfg``; return one result per run."""
    if not cfg.deterministic:
        return _train(cfg)
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(cfg)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _train(cfg: TrainConfig) -> list[dict[str, Any]]:
    from droppath.apps.data import load_dataset

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed()
    active: list[Run] = []
    try:
        out = Path(cfg.out)
        if dist.main:
            check_writable(out)
        data = load_dataset(cfg.data, cfg.data_dir, cfg.image_size)
        plan = [("with_sd", cfg.p or 0.0)]
        if cfg.compare:
            plan.append(("without_sd", 0.0))
        if not cfg.resume and not cfg.overwrite:
            # On every rank, as it only reads: all stop together instead of waiting for rank 0.
            check_fresh(out, ["with_sd", "without_sd"])
        if dist.main and not cfg.resume and cfg.overwrite:
            clear_previous(out)
        for name, p in plan:
            folder = out / name
            if dist.main:
                folder.mkdir(parents=True, exist_ok=True)
            active.append(Run(cfg, data, p=p, folder=folder, dist=dist, label=name))
        last = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
        for epoch in range(last):
            order = active[epoch % len(active) :] + active[: epoch % len(active)]
            for run in order:  # interleaved, first place alternating
                if run.epochs_done == epoch:
                    run.train_epoch()
        runs = [run.result() for run in active]
        if dist.main and all(r["finished"] for r in runs):
            table = format_results(runs)
            atomic_write_bytes(out / "results.md", (table + "\n").encode())
            result = {
                "config": asdict(cfg),
                "processes": dist.world,
                "runs": [summary(r) for r in runs],
            }
            atomic_write_bytes(out / "results.json", json.dumps(result, indent=2).encode())
            plot(runs, out / "plot.png")
            print(table)
            print(f"wrote {out}/results.md, results.json, plot.png and per-run metrics")
        elif dist.main:
            print(f"stopped after epoch {cfg.stop_after}; continue with --resume --out {out}")
        return runs
    finally:
        active.clear()  # the DDP wrappers go before the process group (destroy_distributed)
        destroy_distributed(dist)
