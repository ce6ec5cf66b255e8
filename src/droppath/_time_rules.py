"""The time rules of ``DropRateScheduler``, as one table: ``TIME_RULE_TABLE``.

Each rule's name, factor and options (name, check, default); the scheduler's checks and messages
are derived from this table, and so are the command line's flags. A module of its own, without
torch, so that ``droppath train --help`` lists the rules without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from droppath._checks import check_choice, check_positive_int, check_probability

__all__ = ["TIME_RULES", "TIME_RULE_TABLE", "RuleOption", "TimeRule", "check_time_options"]

_REQUIRED: Any = object()


@dataclass(frozen=True)
class RuleOption:
    """An option of a time rule: its name, how a value is checked and converted (the check's
    error names the option), and its default, if it has one (else it is ``required``)."""

    name: str
    parse: Callable[[Any], Any]
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        """Whether the rule needs this option (it has no default)."""
        return self.default is _REQUIRED


@dataclass(frozen=True)
class TimeRule:
    """A time rule of ``DropRateScheduler``: ``factor(step, options)`` multiplies the depth
    rates at ``step`` (counted from 0)."""

    name: str
    factor: Callable[[int, dict[str, Any]], float]
    options: tuple[RuleOption, ...] = ()


def _parse_theta_bar(value: Any) -> float:
    theta_bar = check_probability(value, "theta_bar")
    if theta_bar == 1.0:
        raise ValueError("theta_bar must be a probability in [0, 1), got 1.0")
    return theta_bar


def _parse_gamma(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"gamma must be a number > 0, got {value!r}")
    return float(value)


def _pld(step: int, o: dict[str, Any]) -> float:
    theta_bar, gamma = float(o["theta_bar"]), float(o["gamma"])
    theta = (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar
    return (1.0 - theta) / (1.0 - theta_bar)


def _early(step: int, o: dict[str, Any]) -> float:
    if step >= o["cutoff_step"]:
        return 0.0
    return 1.0 if o["shape"] == "constant" else 1.0 - step / o["cutoff_step"]


_CUTOFF = RuleOption("cutoff_step", lambda v: check_positive_int(v, "cutoff_step", minimum=0))

# The time rules: everything about a rule is here, and the scheduler's checks, the command
# line's flags and their messages are derived from this table (the flags' types and help
# texts live with the command, droppath.apps.commands.train).
TIME_RULE_TABLE: dict[str, TimeRule] = {
    rule.name: rule
    for rule in (
        TimeRule("constant", lambda step, o: 1.0),
        TimeRule(
            "warmup",
            lambda step, o: min(1.0, step / o["warmup_steps"]),
            (RuleOption("warmup_steps", lambda v: check_positive_int(v, "warmup_steps")),),
        ),
        TimeRule(
            "early",
            _early,
            (
                _CUTOFF,
                RuleOption(
                    "shape",
                    lambda v: check_choice(v, "shape", ("linear", "constant")),
                    default="linear",
                ),
            ),
        ),
        TimeRule("late", lambda step, o: 1.0 if step >= o["cutoff_step"] else 0.0, (_CUTOFF,)),
        TimeRule(
            "pld",
            _pld,
            (RuleOption("theta_bar", _parse_theta_bar), RuleOption("gamma", _parse_gamma)),
        ),
    )
}
TIME_RULES = tuple(TIME_RULE_TABLE)


def check_time_options(rule: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for time rule ``rule``, checked and completed with the defaults."""
    spec = TIME_RULE_TABLE[check_choice(rule, "time_rule", TIME_RULES)]
    allowed = [o.name for o in spec.options]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        shown = ", ".join(allowed) if allowed else "none"
        raise ValueError(
            f"time_rule={rule!r} takes the options {shown}, got unknown option(s) "
            f"{', '.join(unknown)}"
        )
    missing = [o.name for o in spec.options if o.required and o.name not in options]
    if missing:
        raise ValueError(f"time_rule={rule!r} needs the option(s) {', '.join(missing)}")
    return {o.name: o.parse(options.get(o.name, o.default)) for o in spec.options}
