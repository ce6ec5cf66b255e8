"""One model in training (``Run``): its optimizer, schedules, data order, random state,
history and checkpoint; its training steps and its evaluation."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from droppath import get_rng_state, set_rng_state
from droppath.apps.data import DataError
from droppath.apps.progress import epoch_line, progress_bar
from droppath.apps.train.checkpointing import (
    CHECKPOINT,
    atomic_save,
    interrupt_deferred,
    write_metrics,
)
from droppath.apps.train.config import TrainConfig
from droppath.apps.train.distributed import Dist
from droppath.scheduler import DropRateScheduler
from droppath.sites import drop_path_sites

__all__ = ["Run"]


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


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The random state of a run: torch's, and under ``torchrun`` droppath's gate stream (the
    batch-mode gates that every rank shares)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "droppath": get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    set_rng_state(state.get("droppath", {}))
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
        self, cfg: TrainConfig, data: Any, *, p: float, folder: Path, dist: Dist, label: str
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
        """Continue from ``state_dict``'s contents."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_scheduler"])
        self.drop_sched.load_state_dict(state["drop_scheduler"])
        self.rng = state["rng"]
        self.history = list(state["history"])
        self.epochs_done = int(state["epoch"])

    def resume(self) -> None:
        """Load this run's checkpoint; say what is resumed. A missing checkpoint, or one that is
        damaged or from another model, is a ``DataError`` and leaves the files as they are."""
        path = self.folder / CHECKPOINT
        if not path.is_file():
            raise DataError(
                f"resume found no checkpoint at {str(path)!r}: run without resume=True to start "
                "fresh"
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
        label = f"{self.label} {epoch + 1}/{cfg.epochs}"
        train_stats = self._train_steps(label)
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
            with interrupt_deferred():  # Ctrl-C waits: the three files always agree
                atomic_save(self.state_dict(), self.folder / CHECKPOINT)
                write_metrics(self.folder, self.history)
        shown = ("train_loss", "train_acc", "test_acc", "epoch_time_s", "rows_per_s")
        stats = {k: self.history[-1][k] for k in shown}
        epoch_line(label, stats, cfg.progress and dist.main)  # where no bar is drawn

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
