"""``droppath train``: train a reference model, with and without stochastic depth, and compare.

One process, or several under ``torchrun --nproc_per_node=N`` (DistributedDataParallel over gloo
on CPUs, NCCL on GPUs, with a DistributedSampler); only rank 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from droppath._checks import MODES, STRATEGIES, check_choice, check_positive_int, check_probability
from droppath._progress import progress_bar
from droppath.data import DATASETS, DataError
from droppath.models.registry import MODEL_NAMES
from droppath.schedules import (
    DEPTH_RULES,
    TIME_RULES,
    DropRateScheduler,
    check_time_options,
    drop_path_sites,
)

__all__ = ["Run", "TrainConfig", "train"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    model: str = "resnet"
    depth: int | None = None
    p: float | None = None
    rule: str = "linear"
    time_rule: str = "constant"
    rule_options: dict[str, Any] = field(default_factory=dict)  # the time rule's options
    mode: str | None = None
    strategy: str = "auto"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    out: str = "runs/digits"
    compile: bool = False
    compare: bool = False
    data: str = "digits"
    data_dir: str | None = None
    image_size: int = 32
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True
    threads: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_choice(self.model, "model", MODEL_NAMES)
        if self.p is None:
            self.p = 0.5 if self.model == "resnet" else 0.1
        self.p = check_probability(self.p)
        if self.mode is None:
            self.mode = "batch" if self.model == "resnet" else "row"
        check_choice(self.mode, "mode", MODES)
        check_choice(self.rule, "rule", DEPTH_RULES)
        check_choice(self.time_rule, "time_rule", TIME_RULES)
        check_choice(self.strategy, "strategy", STRATEGIES)
        check_choice(self.data, "data", DATASETS)
        self.epochs = check_positive_int(self.epochs, "epochs")
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        if self.depth is not None:
            self.depth = check_positive_int(self.depth, "depth")
            if self.model == "resnet" and (self.depth - 2) % 6:
                raise ValueError(
                    f"depth must be 6n + 2 for resnet (20, 56, 110...), got {self.depth}"
                )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a number > 0, got {self.lr}")
        if self.stop_after is not None:
            self.stop_after = check_positive_int(self.stop_after, "stop_after")
        if self.threads is not None:
            self.threads = check_positive_int(self.threads, "threads")
        self.image_size = check_positive_int(self.image_size, "image_size")
        if self.mode == "batch" and self.strategy != "auto":
            raise ValueError(
                f"strategy applies to mode 'row' only, got strategy={self.strategy!r} with "
                "mode='batch'"
            )
        if self.data_dir is not None and self.data == "digits":
            raise ValueError(
                "data_dir is for data 'cifar10' or 'folder', got one with data 'digits' (bundled)"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other, got both")
        self.rule_options = check_time_options(self.time_rule, dict(self.rule_options))


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> Dist:
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


# --------------------------------------------------------------------------------------------
# Files: every write is atomic (a temporary file, then a rename)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def _write_metrics(folder: Path, history: list[dict[str, float]]) -> None:
    _atomic_write_bytes(folder / "metrics.json", json.dumps(history, indent=2).encode())
    text = io.StringIO()
    if history:
        writer = csv.DictWriter(text, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    _atomic_write_bytes(folder / "metrics.csv", text.getvalue().encode())


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise it: files written together stay
    consistent. Only in the main thread, where signal handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _check_fresh(out: Path, plan: list[str]) -> None:
    """Refuse to write over a previous run in ``out`` unless told to (``overwrite``)."""
    old = [out / "results.json", *(out / name / CHECKPOINT for name in plan)]
    found = [str(p.relative_to(out)) for p in old if p.exists()]
    if found:
        raise DataError(
            f"out {str(out)!r} holds a previous run ({', '.join(found)}): resume it, or "
            "overwrite it"
        )


def _clear_previous(out: Path) -> None:
    """Remove what a previous run wrote in ``out`` (only droppath's own files)."""
    names = ("results.md", "results.json", "plot.png")
    run_files = (CHECKPOINT, "metrics.json", "metrics.csv")
    for path in [out / n for n in names] + [
        out / r / n for r in ("with_sd", "without_sd") for n in run_files
    ]:
        path.unlink(missing_ok=True)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".droppath-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"out must be a writable folder, got {str(out)!r} ({e.strerror})") from None


# --------------------------------------------------------------------------------------------
# One training run


def _make_model(cfg: TrainConfig, data: Any, p: float) -> nn.Module:
    from droppath.models import build_model

    return build_model(
        cfg.model,
        depth=cfg.depth,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        p=p,
        rule=cfg.rule,
        mode=cfg.mode,
        strategy=cfg.strategy,
    )


def _evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int
) -> tuple[float, float]:
    model.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(x[i : i + batch])
            loss += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
            correct += float((logits.argmax(1) == y[i : i + batch]).sum())
    model.train()
    return loss / len(x), correct / len(x)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Run:
    """One model in training: its optimizer, schedules, data order, random state and history.

    Runs of a comparison train in the same process, an epoch of each in turn, so that slow and
    fast spells of a shared machine fall on both alike. Each run keeps its own random state, set
    before and saved after each of its epochs, so a run draws the same numbers whether it trains
    alone, interleaved with another, or resumed from its checkpoint. Rank 0 writes to ``folder``.
    """

    def __init__(
        self, cfg: TrainConfig, data: Any, p: float, folder: Path, dist: Dist, label: str
    ) -> None:
        self.cfg, self.data, self.p, self.folder, self.dist, self.label = (
            cfg,
            data,
            p,
            folder,
            dist,
            label,
        )
        torch.manual_seed(cfg.seed)  # same seed on every rank and run: same weights and gates
        self.model = _make_model(cfg, data, p).to(dist.device)
        self.sites = drop_path_sites(self.model)
        self.drop_sched = DropRateScheduler(
            self.model,
            [float(getattr(m, "p", 0.0)) for _, m in self.sites],
            depth_rule=cfg.rule,
            time_rule=cfg.time_rule,
            **cfg.rule_options,
        )
        self.loader_gen = torch.Generator()
        self.sampler, self.loader = self._make_loader()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=cfg.weight_decay,
        )
        self.lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(1, cfg.epochs * len(self.loader))
        )
        self.history: list[dict[str, float]] = []
        self.epochs_done = 0
        self.rng = _rng_state(dist.device)
        if cfg.resume:
            self.resume()
        self.net: nn.Module = self.model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model)
        if cfg.compile:
            self.net = torch.compile(self.net)  # type: ignore[assignment]

    def _make_loader(self) -> tuple[Any, Any]:
        """The training batches: shuffled by ``loader_gen`` (one order per epoch), or split across
        processes by a ``DistributedSampler``."""
        from torch.utils.data import DataLoader, TensorDataset
        from torch.utils.data.distributed import DistributedSampler

        cfg, dist = self.cfg, self.dist
        dataset = TensorDataset(self.data.x_train, self.data.y_train)
        sampler: DistributedSampler[Any] | None = None
        if dist.world > 1:
            sampler = DistributedSampler(
                dataset, dist.world, dist.rank, shuffle=True, seed=cfg.seed
            )
        loader = DataLoader(
            dataset,
            batch_size=max(1, cfg.batch_size // dist.world),
            shuffle=sampler is None,
            sampler=sampler,
            generator=self.loader_gen if sampler is None else None,
            drop_last=True,
        )
        return sampler, loader

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the checkpoint's contents."""
        return {
            "epoch": self.epochs_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_sched.state_dict(),
            "drop_scheduler": self.drop_sched.state_dict(),
            "rng": self.rng,
            "history": self.history,
            "config": asdict(self.cfg),
            "p": self.p,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s contents."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_scheduler"])
        self.drop_sched.load_state_dict(state["drop_scheduler"])
        self.rng = state["rng"]
        self.history = list(state["history"])
        self.epochs_done = int(state["epoch"])

    def resume(self) -> None:
        """Load this run's checkpoint; say what is resumed. A missing checkpoint, or one that is
        damaged or from another model, is a :class:`DataError` and leaves the files as they are."""
        path = self.folder / CHECKPOINT
        if not path.is_file():
            raise DataError(
                f"resume found no checkpoint at {str(path)!r}: run without resume to start fresh"
            )
        try:
            state = torch.load(path, map_location=self.dist.device, weights_only=True)
            self.load_state_dict(state)
        except (OSError, EOFError, RuntimeError, KeyError, ValueError, TypeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"resume cannot use {str(path)!r}: not a checkpoint of this run "
                f"({type(e).__name__}: {reason[:160]})"
            ) from None
        if self.dist.main:
            done = f"{self.epochs_done} of {self.cfg.epochs} epochs done"
            print(f"{self.label}: resuming from {path}, {done}")

    def train_epoch(self) -> None:
        """Train one epoch, evaluate, and (rank 0) write the checkpoint and the metrics."""
        cfg, dist, epoch = self.cfg, self.dist, self.epochs_done
        _set_rng_state(self.rng, dist.device)
        self.loader_gen.manual_seed(cfg.seed * 1000 + epoch)  # epoch e's order, resumed or not
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        train_stats = self._train_steps(f"{self.label} {epoch + 1}/{cfg.epochs}")
        x_test = self.data.x_test.to(dist.device)
        y_test = self.data.y_test.to(dist.device)
        test_loss, test_acc = _evaluate(self.model, x_test, y_test, 256)
        self.history.append(
            {
                "epoch": epoch + 1,
                **train_stats,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "expected_depth": self.expected_depth(),
            }
        )
        self.epochs_done = epoch + 1
        self.rng = _rng_state(dist.device)
        if dist.main:
            with _interrupt_deferred():  # Ctrl-C waits: the three files always agree
                _atomic_save(self.state_dict(), self.folder / CHECKPOINT)
                _write_metrics(self.folder, self.history)

    def _train_steps(self, label: str) -> dict[str, float]:
        """One pass over the training batches; the epoch's loss, accuracy and speed."""
        dist = self.dist
        bar = progress_bar(len(self.loader), label, self.cfg.progress and dist.main)
        self.net.train()
        seen = correct = 0
        loss_sum = 0.0
        _sync(dist.device)
        t0 = time.perf_counter()
        for xb, yb in self.loader:
            xb, yb = xb.to(dist.device), yb.to(dist.device)
            logits = self.net(xb)
            loss = F.cross_entropy(logits, yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            self.lr_sched.step()
            self.drop_sched.step()
            seen += len(yb)
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            if bar:
                elapsed = time.perf_counter() - t0
                stats = {"loss": loss_sum / seen, "acc": correct / seen, "rows/s": seen / elapsed}
                bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()}, refresh=False)
                bar.update(1)
        _sync(dist.device)
        epoch_time = time.perf_counter() - t0
        if bar:
            bar.close()
        return {
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "epoch_time_s": epoch_time,
            "rows_per_s": seen * dist.world / epoch_time,
        }

    def expected_depth(self) -> float:
        """The sum of the sites' keep rates at the current step."""
        return sum(1.0 - r for r in self.drop_sched.get_last_p())

    def result(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "p": self.p,
            "history": self.history,
            "sites": len(self.sites),
            "expected_depth": self.expected_depth(),
            "finished": len(self.history) >= self.cfg.epochs,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# The comparison


def _summary(run: dict[str, Any]) -> dict[str, float]:
    h = run["history"]
    times = [e["epoch_time_s"] for e in h]
    return {
        "p": run["p"],
        "test_acc": h[-1]["test_acc"] if h else float("nan"),
        "epoch_time_s": statistics.median(times) if times else float("nan"),
        "expected_depth": run["expected_depth"],
        "blocks": run["sites"],
    }


def format_results(runs: list[dict[str, Any]]) -> str:
    rows = [_summary(r) for r in runs]
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
    return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
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
    _atomic_write_bytes(path, buf.getvalue())


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Run the training described by ``cfg``; return one result per run."""
    from droppath.data import load_dataset

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = _init_distributed()
    active: list[Run] = []
    try:
        out = Path(cfg.out)
        if dist.main:
            _check_writable(out)
        data = load_dataset(cfg.data, cfg.data_dir, cfg.image_size)
        plan = [("with_sd", cfg.p or 0.0)]
        if cfg.compare:
            plan.append(("without_sd", 0.0))
        if not cfg.resume and not cfg.overwrite:
            # On every rank, as it only reads: all stop together instead of waiting for rank 0.
            _check_fresh(out, ["with_sd", "without_sd"])
        if dist.main and not cfg.resume and cfg.overwrite:
            _clear_previous(out)
        for name, p in plan:
            folder = out / name
            if dist.main:
                folder.mkdir(parents=True, exist_ok=True)
            active.append(Run(cfg, data, p, folder, dist, name))
        last = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
        for epoch in range(last):
            order = active[epoch % len(active) :] + active[: epoch % len(active)]
            for run in order:  # interleaved, first place alternating
                if run.epochs_done == epoch:
                    run.train_epoch()
        runs = [run.result() for run in active]
        if dist.main and all(r["finished"] for r in runs):
            table = format_results(runs)
            _atomic_write_bytes(out / "results.md", (table + "\n").encode())
            summary = {
                "config": asdict(cfg),
                "processes": dist.world,
                "runs": [_summary(r) for r in runs],
            }
            _atomic_write_bytes(out / "results.json", json.dumps(summary, indent=2).encode())
            _plot(runs, out / "plot.png")
            print(table)
            print(f"wrote {out}/results.md, results.json, plot.png and per-run metrics")
        elif dist.main:
            print(f"stopped after epoch {cfg.stop_after}; continue with --resume --out {out}")
        return runs
    finally:
        if dist.world > 1:
            import gc

            import torch.distributed as tdist

            # Free the DDP wrappers (and their reducers) while the process group still lives,
            # so that its destructor does not run later from theirs, at interpreter teardown.
            active.clear()
            gc.collect()
            tdist.destroy_process_group()
