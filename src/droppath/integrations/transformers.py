"""A Hugging Face ``Trainer`` callback that schedules drop rates: ``DropRateCallback``.

Needs ``transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from droppath.integrations._common import ScheduleAtStep

__all__ = ["DropRateCallback"]


class DropRateCallback(TrainerCallback):  # type: ignore[misc]
    """Schedule the drop rates of the model that a Hugging Face ``Trainer`` trains.

    Takes ``droppath.DropRateScheduler``'s arguments without the model. When training starts
    it builds the scheduler for the trainer's model; at the beginning of each optimizer step it sets
    the rates of schedule step ``state.global_step`` (the ``k``-th optimizer step runs with the
    rates of step ``k``, with gradient accumulation too). The step is the trainer's, which its
    checkpoints hold: a run resumed with ``resume_from_checkpoint`` goes on with the rates of its
    step. At each logging step the rates join the logs as ``drop_rate/<site>`` (in
    ``trainer.state.log_history``, and for the reporters listed after this callback).

    Args:
        p: the largest rate for the depth rule, or one rate per site.
        **scheduler_options: ``depth_rule``, ``time_rule``, ``total_steps`` and the time rule's
            options, as for ``droppath.DropRateScheduler``.

    Examples:
        >>> from droppath.integrations.transformers import DropRateCallback  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=data,
        ...         callbacks=[DropRateCallback(0.2, time_rule="warmup", warmup_steps=100)])
        ... # doctest: +SKIP
    """

    def __init__(self, p: float | Sequence[float], **scheduler_options: Any) -> None:
        self._schedule = ScheduleAtStep(p, **scheduler_options)
        self._rates: dict[str, float] = {}

    @property
    def scheduler(self) -> Any:
        """The ``droppath.DropRateScheduler``, once training has started."""
        return self._schedule.scheduler

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        if model is None:
            raise ValueError("DropRateCallback needs the trainer's model at train begin, got None")
        self._schedule.start(model)
        self._rates = self._schedule.at(state.global_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._rates = self._schedule.at(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs is None:
            return
        logs.update(self._rates)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._rates)
