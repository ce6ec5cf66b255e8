"""What the trainer callbacks share: a ``DropRateScheduler`` kept at the trainer's step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from droppath.acceleration import check_states
from droppath.scheduler import DropRateScheduler
from droppath.sites import site_rate

# The attributes under which wrappers hold the module they wrap: FSDP1's, activation
# checkpointing's, torch.compile's. Logged names leave them out, so that a site is logged under
# the same name with and without them (Lightning's "fsdp" strategy wraps the model).
_WRAPPED = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _unwrapped(name: str) -> str:
    """``name`` without the wrappers' segments."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPED)


class ScheduleAtStep:
    """Builds a ``droppath.DropRateScheduler`` for a model when training starts, with the
    arguments given here, and sets the rates of schedule step ``k`` for optimizer step ``k``
    (counted from 0), which is what the trainer's own step counter says: a resumed run continues
    with the rates of its step."""

    def __init__(self, p: float | Sequence[float], **scheduler_options: Any) -> None:
        self.p = p
        self.options = scheduler_options
        self.scheduler: DropRateScheduler | None = None

    def start(self, model: nn.Module) -> DropRateScheduler:
        """Build the scheduler for ``model`` (checks the arguments: errors come at train start).

        A second start on the same model (another ``fit`` call) keeps the scheduler: its base
        rates were read from the model as it was built, not from rates the schedule set since.
        """
        if self.scheduler is None or self.scheduler.model is not model:
            self.scheduler = DropRateScheduler(model, self.p, **self.options)
        return self.scheduler

    def at(self, step: int) -> dict[str, float]:
        """Set the rates of ``step``; return the rates the model's sites hold then (looked up by
        name, so the modules that run, whatever replaced them), for the trainer's logger, and,
        once an accelerated block's check has failed, ``droppath/blocks_on_mask``: how many run
        every row (their names and reasons: ``droppath.acceleration.check_states``)."""
        if self.scheduler is None:
            raise RuntimeError("the drop-rate schedule has not started: training has not begun")
        sched = self.scheduler
        if step != sched.last_step:
            sched.step_to(step)
        logged = {f"drop_rate/{_unwrapped(name)}": site_rate(site) for name, site in sched.sites}
        failed = sum(s.startswith("failed") for s in check_states(sched.model).values())
        if failed:
            logged["droppath/blocks_on_mask"] = float(failed)
        return logged
