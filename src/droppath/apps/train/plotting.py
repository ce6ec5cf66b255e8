"""The plot of a training: loss, test accuracy and time per epoch of each run, side by side.
matplotlib (the ``train`` extra) is imported only here, when the plot is drawn."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from droppath.apps.train.checkpointing import atomic_write_bytes

__all__ = ["plot"]


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Draw ``runs`` (their results) into the PNG file ``path``; without matplotlib, say so."""
    try:
        import matplotlib
    except ImportError:
        print(f"no {path.name}: plotting needs matplotlib: pip install 'droppath[train]'")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, run in enumerate(runs):
        h = run["history"]
        ep = [e["epoch"] for e in h]
        label = f"{run['label']} (p={run['p']:g})"
        color = f"C{i}"  # one color per run on every panel; test loss dashed
        axes[0].plot(ep, [e["train_loss"] for e in h], color=color, label=f"{label} train")
        axes[0].plot(ep, [e["test_loss"] for e in h], "--", color=color, label=f"{label} test")
        axes[1].plot(ep, [e["test_acc"] for e in h], color=color, label=label)
        axes[2].plot(ep, [e["epoch_time_s"] for e in h], marker="o", color=color, label=label)
    for ax, title in zip(axes, ("loss", "test accuracy", "time per epoch (s)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: whole numbers
    axes[2].set_ylim(bottom=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
