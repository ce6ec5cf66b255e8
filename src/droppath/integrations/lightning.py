"""A PyTorch Lightning callback that schedules drop rates: ``DropRateCallback``.

Needs ``lightning`` (or ``pytorch_lightning``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl

from droppath import get_rng_state, set_rng_state
from droppath.integrations._common import ScheduleAtStep

__all__ = ["DropRateCallback"]

_RNG = "droppath_rng_state"  # droppath's gate stream, beside the scheduler's state


class DropRateCallback(pl.Callback):  # type: ignore[misc]
    """Schedule the drop rates of the ``LightningModule`` under training.

    Takes ``droppath.DropRateScheduler``'s arguments without the model. When fitting starts,
    it builds the scheduler for the module; before each training batch it sets the rates of
    schedule step ``trainer.global_step`` (the optimizer steps done so far, so the ``k``-th
    optimizer step runs with the rates of step ``k``, with gradient accumulation too); it logs
    them as ``drop_rate/<site>`` through the module's logger, and saves the scheduler's state with
    the trainer's checkpoint (a resumed run goes on with the rates of its step), and with it
    droppath's gate stream under a distributed strategy (``droppath.get_rng_state``), so that a
    resumed run draws the batch-mode gates of one that never stopped.

    Args:
        p: the largest rate for the depth rule, or one rate per site.
        **scheduler_options: ``depth_rule``, ``time_rule``, ``total_steps`` and the time rule's
            options, as for ``droppath.DropRateScheduler``.

    Examples:
        >>> from droppath.integrations.lightning import DropRateCallback  # doctest: +SKIP
        >>> trainer = pl.Trainer(callbacks=[DropRateCallback(0.4, time_rule="warmup",
        ...                                                  warmup_steps=100)])  # doctest: +SKIP
    """

    def __init__(self, p: float | Sequence[float], **scheduler_options: Any) -> None:
        super().__init__()
        self._schedule = ScheduleAtStep(p, **scheduler_options)
        self._saved: dict[str, Any] | None = None

    @property
    def scheduler(self) -> Any:
        """The ``droppath.DropRateScheduler``, once fitting has started."""
        return self._schedule.scheduler

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        sched = self._schedule.start(pl_module)
        if self._saved is not None:
            saved = dict(self._saved)
            set_rng_state(saved.pop(_RNG, {}))
            sched.load_state_dict(saved)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        rates = self._schedule.at(trainer.global_step)
        if rates:
            pl_module.log_dict(rates, on_step=True, on_epoch=False, logger=True)

    def state_dict(self) -> dict[str, Any]:
        sched = self._schedule.scheduler
        if sched is None:
            return {}
        state: dict[str, Any] = sched.state_dict()
        rng = get_rng_state()
        return {**state, _RNG: rng} if rng else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = dict(state_dict) or None
