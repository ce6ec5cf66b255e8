"""Drop rates over training: ``DropRateScheduler`` and its time rules.

A time rule multiplies the depth rates (``droppath.rates``, set on the sites of
``droppath.sites``) by a factor per training step. The rules are one table, ``TIME_RULE_TABLE``
(in ``droppath._time_rules``, which needs no torch): each rule's name, factor and options (name,
check, default); the scheduler's checks and messages are derived from it, and so are the command
line's flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from droppath._checks import check_int, check_model, check_positive_int
from droppath._time_rules import (
    TIME_RULE_TABLE,
    TIME_RULES,
    RuleOption,
    TimeRule,
    check_time_options,
)
from droppath.rates import DEFAULT_RULE, Rates
from droppath.site_rates import check_reaches, resolve_site_rates
from droppath.sites import SiteTable, is_drop_path_site, set_site_rate

__all__ = [
    "TIME_RULES",
    "TIME_RULE_TABLE",
    "DropRateScheduler",
    "RuleOption",
    "TimeRule",
    "check_time_options",
]


class DropRateScheduler:
    """Set the drop rates of a model's drop-path sites by depth and by training step.

    In the style of ``torch.optim.lr_scheduler``: construct it once (it sets the rates of step 0),
    call ``step`` once per training iteration (or ``step_to`` with a trainer's own step
    counter), and save ``state_dict`` with the checkpoint.
    The rate of a site at step ``t`` is its base rate times ``f(t)``. The base rates are what
    ``set_drop_rates`` gives for ``p`` and ``depth_rule``, read from the model once, at
    construction: with the default ``"model"`` rule, the model's own profile then, scaled to
    ``p`` (never the rates the scheduler sets later). The time rule ``f`` is one of:

    - ``"constant"``: ``f = 1``, the usual stochastic depth.
    - ``"warmup"`` (``warmup_steps``): ``f = min(1, t / warmup_steps)``, for deep models that do not
      converge with drop path from the first step (as learning-rate warm-up does for the rate).
    - ``"early"`` (``cutoff_step``, optional ``shape="linear"`` or ``"constant"``): drop path only
      before ``cutoff_step``, then none; Liu et al., "Dropout Reduces Underfitting" (ICML 2023),
      early stochastic depth. Their released scheduler offers a constant or a linearly decreasing
      rate before the cutoff; ``"linear"`` (from the full rate down to 0 at the cutoff) is the
      default here.
    - ``"late"`` (``cutoff_step``): no drop path before ``cutoff_step``, the full rate from it on;
      the same paper's late stochastic depth.
    - ``"pld"`` (``theta_bar``, ``gamma``): progressive layer dropping, Zhang & He, "Accelerating
      Training of Transformer-Based Language Models with Progressive Layer Dropping" (NeurIPS
      2020): the global keep ratio follows ``theta(t) = (1 - theta_bar) * exp(-gamma * t) +
      theta_bar``, so ``f(t) = (1 - theta(t)) / (1 - theta_bar)`` rises from 0 to 1. With
      ``p = 1 - theta_bar`` and the ``"linear"`` depth rule this is the paper's
      ``1 - l / L * (1 - theta(t))`` keep probability for layer ``l`` of ``L``.

    The scheduler keeps the sites' names and finds them on the model at each step, so it drives
    the modules that run even when ``droppath.accelerate`` or ``convert`` replaces them
    after it was built.

    Args:
        model: the model whose sites (see ``drop_path_sites``) are scheduled; not a traced
            ``torch.fx.GraphModule``.
        p: the largest rate for the depth rule, or one rate per site.
        depth_rule: see ``depth_rates``. Default: ``"model"``.
        time_rule: one of the rules above. Default: ``"constant"``.
        total_steps: the planned number of steps, if known; a rule option that counts steps
            (``warmup_steps``, ``cutoff_step``) must not exceed it. Default: None.
        **rule_options: the options of the time rule, named above.

    Examples:
        >>> from torch import nn
        >>> from droppath import DropRateScheduler, Residual
        >>> model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(2)])
        >>> sched = DropRateScheduler(model, 0.4, time_rule="warmup", warmup_steps=4)
        >>> sched.get_last_p()  # built with rate 0: linspace, block 0 never drops
        [0.0, 0.0]
        >>> sched.step(); sched.step()
        >>> sched.get_last_p()
        [0.0, 0.2]
        >>> model[1].p
        0.2
    """

    def __init__(
        self,
        model: nn.Module,
        p: float | Sequence[float],
        *,
        depth_rule: str = DEFAULT_RULE,
        time_rule: str = "constant",
        total_steps: int | None = None,
        **rule_options: Any,
    ) -> None:
        check_model(model, "DropRateScheduler")
        rates = Rates.of(p, depth_rule, "depth_rule")
        table = SiteTable.of(model)
        check_reaches(table, rates, "DropRateScheduler", type(model).__name__)
        self.model = model
        planned = resolve_site_rates(model, table, rates)
        self.site_names = [name for name, _ in planned]
        self.base_rates = [rate for _, rate in planned]
        self.depth_rule = depth_rule
        self.time_rule = time_rule
        self.options = check_time_options(time_rule, rule_options)
        if total_steps is not None:
            total_steps = check_positive_int(total_steps, "total_steps")
            for key in ("warmup_steps", "cutoff_step"):
                if key in self.options and self.options[key] > total_steps:
                    raise ValueError(
                        f"{key} must be <= total_steps ({total_steps}), got {self.options[key]}"
                    )
        self.total_steps = total_steps
        self.last_step = 0
        self._last_p: list[float] = []
        self.step_to(0)

    def rates_at(self, step: int) -> list[float]:
        """The rates of every site at ``step``, without changing the model."""
        step = check_positive_int(step, "step", minimum=0)
        factor = TIME_RULE_TABLE[self.time_rule].factor(step, self.options)
        return [rate * factor for rate in self.base_rates]

    @property
    def sites(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every scheduled site, as the model holds them now."""
        return [(name, self._site(name)) for name in self.site_names]

    def _site(self, name: str) -> nn.Module:
        try:
            module: nn.Module | None = self.model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or not is_drop_path_site(module):
            now = type(module).__name__ if module is not None else "nothing"
            raise RuntimeError(
                f"drop-path site {name!r} of the scheduled {type(self.model).__name__} is gone "
                f"(the model holds {now} there): build the DropRateScheduler again after "
                "changing the model's structure (prune, or replacing modules)"
            )
        return module

    def step(self) -> None:
        """Advance one training step and set the rates for it."""
        self.step_to(self.last_step + 1)

    def step_to(self, step: int) -> None:
        """Go to training step ``step`` (counted from 0) and set its rates on the model.

        For a training loop that keeps its own step counter (a trainer callback, a resumed
        run): the schedule then follows that counter, forward or back, and ``step``
        continues from ``step``. ``last_step`` holds the step now.

        Examples:
            >>> from torch import nn
            >>> from droppath import DropRateScheduler, Residual
            >>> model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(2)])
            >>> sched = DropRateScheduler(model, 0.4, time_rule="warmup", warmup_steps=4)
            >>> sched.step_to(2)
            >>> sched.last_step, sched.get_last_p()
            (2, [0.0, 0.2])
            >>> sched.step()
            >>> sched.last_step, model[1].p
            (3, 0.30000000000000004)
        """
        step = check_positive_int(step, "step", minimum=0)
        rates = self.rates_at(step)
        sites = self.sites  # raises, naming it, if a site is gone
        self.last_step, self._last_p = step, rates
        for (_, site), rate in zip(sites, rates, strict=True):
            set_site_rate(site, rate)

    def get_last_p(self) -> list[float]:
        """The rates set at the current step, one per site, in forward order."""
        return list(self._last_p)

    def state_dict(self) -> dict[str, Any]:
        """The schedule and its position, to save with a checkpoint."""
        return {
            "last_step": self.last_step,
            "base_rates": list(self.base_rates),
            "depth_rule": self.depth_rule,
            "time_rule": self.time_rule,
            "options": dict(self.options),
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the rates of that step are set on the model again."""
        if len(state["base_rates"]) != len(self.site_names):
            raise ValueError(
                f"state_dict has {len(state['base_rates'])} rates, the model has "
                f"{len(self.site_names)} drop-path sites"
            )
        self.base_rates = [float(r) for r in state["base_rates"]]
        self.depth_rule = state["depth_rule"]
        self.time_rule = state["time_rule"]
        self.options = check_time_options(self.time_rule, dict(state["options"]))
        self.total_steps = state["total_steps"]
        self.step_to(check_int(state["last_step"], "last_step"))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"{type(self).__name__}(sites={len(self.site_names)}, depth_rule={self.depth_rule!r}, "
            f"time_rule={self.time_rule!r}{opts}, last_step={self.last_step})"
        )
