"""The rates of a model's drop-path sites: planned once, written once.

A call that sets rates checks what it was asked for once (``droppath.rates.Rates``), walks the
model once (``droppath.sites.SiteTable``), plans every site's rate with a pure function
(``plan_rates``, which changes nothing) and writes the plan (``write_rates``). ``set_drop_rates``,
``resolve_site_rates`` (``DropRateScheduler``) and ``accelerate`` are that path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import nn

from droppath._checks import check_model
from droppath._warn import warn
from droppath.rates import DEFAULT_RULE, MODEL_RULE, Rates, positional_rule
from droppath.sites import SiteTable, drop_path_sites, fill_slots, set_site_rate, site_rate

__all__ = [
    "RatePlan",
    "check_reaches",
    "plan_rates",
    "resolve_site_rates",
    "set_drop_rates",
    "write_rates",
]

# What droppath looks for in a model, for the message of a call that finds nothing.
_SEARCHED = (
    "drop-path modules (droppath's DropPath, Residual and layer-drop layers, timm's DropPath, "
    "torchvision's StochasticDepth, Hugging Face's *DropPath) and empty drop-path slots "
    "(attributes drop_path*, stochastic_depth* or stochastic_dropout holding nn.Identity or None)"
)


def check_reaches(table: SiteTable, rates: Rates | None, action: str, model: str) -> None:
    """Refuse rates above 0 that reach nothing in the model of ``table`` (a class named
    ``model``), and warn about any other call (no rates, or 0) that has nothing to act on: a
    silent no-op would train a model without stochastic depth."""
    if table.sites or table.slots:
        return
    found = f"{action} found nothing to act on in this {model}: it looked for {_SEARCHED}"
    if rates is not None and rates.p > 0.0:
        raise ValueError(f"p={rates.given} reaches no drop-path site: {found}")
    warn(f"{found}; nothing was changed")


class RatePlan(NamedTuple):
    """What ``plan_rates`` plans: the empty slots to fill with a ``DropPath`` (``fill``), and the
    rate of every site, filled slots included, by name (``rates``)."""

    fill: tuple[str, ...]
    rates: dict[str, float]


def plan_rates(table: SiteTable, rates: Rates) -> RatePlan:
    """The rate of every site of ``table`` (a pure function: nothing is changed).

    Explicit rates go to the sites in order. ``"model"`` scales the sites' current rates (their
    profile); without one (every rate 0) it is ``"linspace"``. A positional rule gives each site
    its block's rate, and plans to fill the empty slots whose block gets a rate above 0.
    """
    names = [name for name, _ in table.sites]
    if rates.explicit is not None:
        return RatePlan((), dict(zip(names, rates.per_position(len(names)), strict=True)))
    profile = [site_rate(m) for _, m in table.sites] if rates.rule == MODEL_RULE else None
    if positional_rule(rates.rule, profile) == MODEL_RULE:
        return RatePlan((), dict(zip(names, rates.per_position(len(names), profile), strict=True)))
    by_position = rates.per_position(table.depth)
    planned = {name: by_position[table.positions[name]] for name in names}
    fill = tuple(name for name, _, _ in table.slots if by_position[table.positions[name]] > 0.0)
    planned.update({name: by_position[table.positions[name]] for name in fill})
    return RatePlan(fill, planned)


def write_rates(model: nn.Module, table: SiteTable, plan: RatePlan) -> list[tuple[str, nn.Module]]:
    """Fill the slots that ``plan`` fills and set every planned rate. Returns the sites of
    ``model`` after the call, in forward order (``table``'s, unless a slot was filled)."""
    sites = _filled(model, table, plan)
    for name, site in sites:
        set_site_rate(site, plan.rates[name])
    return sites


def _filled(model: nn.Module, table: SiteTable, plan: RatePlan) -> list[tuple[str, nn.Module]]:
    """Fill the slots that ``plan`` fills; the sites after that, in forward order."""
    if not plan.fill:
        return list(table.sites)
    fill_slots(model, plan.fill)
    return drop_path_sites(model)


def set_drop_rates(
    model: nn.Module, p: float | Sequence[float], rule: str = DEFAULT_RULE
) -> list[tuple[str, float]]:
    """Set the drop rate of every drop-path site of ``model`` by a depth rule.

    By default (``rule="model"``) each site keeps its share of the model's current rates, scaled
    so that the largest is ``p``: a model built with timm's, torchvision's or Hugging Face's
    ``drop_path_rate`` keeps its library's curve. A model whose rates are all 0 gets
    ``"linspace"``, what those libraries compute.

    The positional rules go by block, as the libraries compute them: the sites of one block (a
    ViT block's attention and MLP) share its rate, and a block whose slot is empty (timm and
    Hugging Face put ``nn.Identity`` or None there when a rate is 0) still counts as a position.
    Such a slot that gets a rate above 0 receives a ``DropPath`` (no parameters, so
    ``state_dict()`` keys do not change). With the same ``p``, ``rule="linspace"`` reproduces
    timm's, torchvision's and Hugging Face's rates, and ``rule="efficientnet"`` EfficientNet's.

    A ``p`` above 0 on a model with no drop-path site and no empty slot raises ``ValueError``;
    ``p = 0`` there warns.

    Args:
        model: any module (not a traced ``torch.fx.GraphModule``); its sites are found by
            ``drop_path_sites``.
        p: the largest rate for ``rule`` (see ``depth_rates``), or an explicit sequence with
            one rate per site (empty slots excluded).
        rule: a depth rule of ``depth_rates``. Default: ``"model"``.

    Returns:
        ``(qualified module name, rate)`` for every site set, in forward order.

    Examples:
        >>> from torch import nn
        >>> from droppath import Residual, set_drop_rates
        >>> model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(4)])
        >>> set_drop_rates(model, 0.3, rule="linear")
        [('0', 0.075), ('1', 0.15), ('2', 0.22499999999999998), ('3', 0.3)]
        >>> set_drop_rates(model, 0.2)  # the same profile, up to 0.2
        [('0', 0.05), ('1', 0.1), ('2', 0.15000000000000002), ('3', 0.2)]
        >>> model[3].p
        0.2
    """
    check_model(model, "set_drop_rates")
    rates = Rates.of(p, rule)
    table = SiteTable.of(model)
    check_reaches(table, rates, "set_drop_rates", type(model).__name__)
    plan = plan_rates(table, rates)
    return [(name, plan.rates[name]) for name, _ in write_rates(model, table, plan)]


def resolve_site_rates(model: nn.Module, table: SiteTable, rates: Rates) -> list[tuple[str, float]]:
    """The rate ``rates`` give each drop-path site of ``model`` (``table``, its walk), set on
    none of them: what ``set_drop_rates`` sets.

    The empty slots that get a rate above 0 are filled first (with ``DropPath(0.0)``), so the
    sites listed are those of the model after the call, in forward order.
    """
    plan = plan_rates(table, rates)
    return [(name, plan.rates[name]) for name, _ in _filled(model, table, plan)]
