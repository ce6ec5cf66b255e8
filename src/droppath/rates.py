"""Drop rates across depth: ``depth_rates`` and its rules.

A module of its own, below everything that applies rates (``sites``, ``scheduler``,
``layerdrop``, the models), so that none of them needs another to know the rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from droppath._checks import check_choice, check_positive_int, check_probability

__all__ = [
    "DEFAULT_RULE",
    "DEPTH_RULES",
    "DEPTH_RULE_TABLE",
    "FALLBACK_RULE",
    "MODEL_RULE",
    "Rates",
    "depth_rates",
    "is_rates",
    "positional_rule",
]


def _curve(scale: Callable[[int, int], float]) -> Callable[[int, int], float]:
    """A torchtune curve ``get_scale(scale_type, n - 1, l)``; one block alone gets the full rate."""
    return lambda i, n: scale(i, n - 1) if n > 1 else 1.0


# The depth rules: the fraction of ``p`` that block ``i`` (from 0) of ``n`` drops with. Adding a
# rule is one entry here (and its line in depth_rates' docstring).
DEPTH_RULE_TABLE: dict[str, Callable[[int, int], float]] = {
    "linear": lambda i, n: (i + 1) / n,
    "linspace": lambda i, n: i / (n - 1) if n > 1 else 0.0,
    "uniform": lambda i, n: 1.0,
    "efficientnet": lambda i, n: i / n,
    "exp": _curve(lambda i, m: math.exp(i * math.log(2) / m) - 1),
    "log": _curve(lambda i, m: math.log(i + 1) / math.log(m + 1)),
    "sin": _curve(lambda i, m: math.sin(0.5 * math.pi * i / m)),
    "sigmoid": _curve(lambda i, m: 1 / (1 + math.exp(-10 * (i / m - 0.5)))),
    "step": lambda i, n: 1.0 if i >= n // 2 else 0.0,
}
# The rule that keeps the profile a model was built with, scaled to the new ``p``; where there is
# no profile (every rate 0, or none given) it is FALLBACK_RULE. It is every entry point's default.
MODEL_RULE = "model"
FALLBACK_RULE = "linspace"
DEFAULT_RULE = MODEL_RULE
DEPTH_RULES = (MODEL_RULE, *DEPTH_RULE_TABLE)


def positional_rule(rule: str, profile: Sequence[float] | None) -> str:
    """The rule of the table that gives the rates: ``rule``, or ``FALLBACK_RULE`` for
    ``MODEL_RULE`` without a profile (``None``, or every rate 0)."""
    if rule == MODEL_RULE and (profile is None or max(profile, default=0.0) <= 0.0):
        return FALLBACK_RULE
    return rule


def depth_rates(
    n: int, p: float, rule: str = DEFAULT_RULE, *, profile: Sequence[float] | None = None
) -> list[float]:
    """The drop rate of each of ``n`` blocks, from the input side to the output side.

    Rules:

    - ``"model"`` (the default): the rates ``profile`` that the model has now (what it was built
      with), scaled so that the largest is ``p``: ``profile[l] / max(profile) * p``. A model built
      with timm's, torchvision's or Hugging Face's ``drop_path_rate`` keeps its library's curve
      (linspace, EfficientNet's, the same rate everywhere, ...). Without a profile (``None``, or
      every rate 0: a model built without stochastic depth) it is ``"linspace"``.
    - ``"linear"``: Huang et al., "Deep Networks with Stochastic Depth" (ECCV 2016), eq. (4): block
      ``l`` of ``n``, counted from 1, drops with ``p * l / n``; the last block drops with ``p``.
    - ``"linspace"``: what timm and torchvision models compute, ``torch.linspace(0, p, n)``: block
      ``l``, counted from 0, drops with ``p * l / (n - 1)``; the first block never drops.
    - ``"uniform"``: every block drops with ``p`` (the paper's "uniform" alternative).
    - ``"efficientnet"``: what EfficientNet computes in timm and torchvision: block ``l``, counted
      from 0, drops with ``p * l / n``; the first block never drops, the last drops with
      ``p * (n - 1) / n``.
    - The curves of LayerSkip (Elhoushi et al., ACL 2024) as torchtune computes them
      (``torchtune/modules/layer_dropout.py``, ``get_scale`` with ``scale_period = n - 1`` and
      block ``l`` counted from 0; one block alone drops with ``p``), with ``t = l / (n - 1)``:
      ``"exp"``: ``p * (2 ** t - 1)``; ``"log"``: ``p * log(l + 1) / log(n)``; ``"sin"``:
      ``p * sin(pi * t / 2)``; ``"sigmoid"``: ``p / (1 + exp(-10 * (t - 0.5)))``.
    - ``"step"``: the first ``n // 2`` blocks never drop, the others drop with ``p``. torchtune
      names a ``STEP`` scale without a formula; this one is droppath's.

    The rates are Python floats computed on the host, so they are the same for a model on any
    device, the meta device included.

    Args:
        n: the number of blocks, an int >= 0.
        p: the largest rate, in [0, 1].
        rule: one of the rules above. Default: ``"model"``.
        profile: for ``"model"``, the rates the ``n`` blocks have now; ignored by the other rules.
            Default: None.

    Examples:
        >>> from droppath import depth_rates
        >>> depth_rates(4, 0.5, rule="linear")
        [0.125, 0.25, 0.375, 0.5]
        >>> depth_rates(5, 0.2, rule="linspace")
        [0.0, 0.05, 0.1, 0.15000000000000002, 0.2]
        >>> depth_rates(3, 0.1, rule="uniform")
        [0.1, 0.1, 0.1]
        >>> depth_rates(3, 0.4, profile=[0.0, 0.1, 0.2])  # the model's curve, scaled to 0.4
        [0.0, 0.2, 0.4]
        >>> depth_rates(3, 0.4)  # no profile: linspace
        [0.0, 0.2, 0.4]
    """
    n = check_positive_int(n, "n", minimum=0)
    p = check_probability(p)
    check_choice(rule, "rule", DEPTH_RULES)
    if profile is not None:
        if isinstance(profile, str) or not isinstance(profile, Sequence) or len(profile) != n:
            raise ValueError(
                f"profile must be a sequence of one rate per block ({n}), got {profile!r}"
            )
        profile = [check_probability(v, f"profile[{i}]") for i, v in enumerate(profile)]
    return _rates(n, p, rule, profile)


def _rates(n: int, p: float, rule: str, profile: Sequence[float] | None) -> list[float]:
    """``depth_rates`` on checked arguments."""
    rule = positional_rule(rule, profile)
    if rule == MODEL_RULE:
        assert profile is not None  # positional_rule gives FALLBACK_RULE without one
        top = max(profile)
        return list(profile) if p == top else [r / top * p for r in profile]
    fraction = DEPTH_RULE_TABLE[rule]
    return [p * fraction(i, n) for i in range(n)]


def is_rates(p: Any) -> bool:
    """Whether ``p`` is a sequence of rates rather than one rate (a string is neither)."""
    return isinstance(p, Sequence) and not isinstance(p, str)


@dataclass(frozen=True)
class Rates:
    """The rates a call asks for, checked once, where the call enters the library: explicit rates,
    one per site (``explicit``), or the largest rate ``p`` and a depth ``rule``. What the call
    then does with them (``droppath.site_rates.plan_rates``, ``layer_drop``) checks nothing again.

    Examples:
        >>> from droppath.rates import Rates
        >>> Rates.of(0.2, "linear").per_position(4)
        [0.05, 0.1, 0.15000000000000002, 0.2]
        >>> Rates.of([0.1, 0.3], "model").explicit
        (0.1, 0.3)
        >>> Rates.of(1.5, "linear")
        Traceback (most recent call last):
        ...
        ValueError: p must be a probability in [0, 1], got 1.5
    """

    p: float
    rule: str
    explicit: tuple[float, ...] | None = None
    given: str = ""  # ``repr`` of the ``p`` the call was given, for messages

    @classmethod
    def of(cls, p: float | Sequence[float], rule: str, rule_name: str = "rule") -> Rates:
        """Check ``p`` (a rate, or a sequence of rates) and ``rule`` (named ``rule_name`` in
        errors) once."""
        rule = check_choice(rule, rule_name, DEPTH_RULES)
        if is_rates(p):
            assert isinstance(p, Sequence)
            rates = tuple(check_probability(v, f"p[{i}]") for i, v in enumerate(p))
            return cls(max(rates, default=0.0), rule, rates, repr(p))
        return cls(check_probability(p), rule, None, repr(p))

    def per_position(self, n: int, profile: Sequence[float] | None = None) -> list[float]:
        """The rate of each of ``n`` positions: the explicit rates (there must be ``n``), or
        ``depth_rates(n, p, rule, profile=profile)``, whose ``profile`` is the sites' current
        rates, for ``"model"``."""
        if self.explicit is not None:
            if len(self.explicit) != n:
                raise ValueError(
                    f"p must have one rate per drop-path site: the model has {n} sites, "
                    f"got {len(self.explicit)} rates"
                )
            return list(self.explicit)
        return _rates(n, self.p, self.rule, profile)
