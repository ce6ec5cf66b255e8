"""Drop-path sites: finding them in any model, their rates across depth, and ``convert``.

Drop-path sites are found by duck typing, without importing the libraries that define them:
droppath's ``DropPath`` and ``Residual``; timm's ``DropPath`` (attribute ``drop_prob``);
torchvision's ``StochasticDepth`` (attributes ``p`` and ``mode``); and the ``*DropPath`` classes
of Hugging Face transformers (attribute ``drop_prob``). An empty slot is where those libraries
put no module for a rate of 0 (see ``empty_slots``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from droppath._checks import check_choice, check_model, check_probability
from droppath._swap import mixed_class
from droppath._warn import warn
from droppath.drop import DropPath
from droppath.layerdrop import is_layer_drop_site
from droppath.rates import (
    DEFAULT_RULE,
    DEPTH_RULES,
    MODEL_RULE,
    depth_rates,
    positional_rule,
    resolve_rates,
)
from droppath.residual import Residual

__all__ = [
    "check_reaches",
    "convert",
    "drop_path_sites",
    "empty_slots",
    "fill_slots",
    "is_drop_path_site",
    "resolve_site_rates",
    "set_drop_rates",
    "set_site_rate",
    "site_positions",
    "site_rate",
]


def _kind(module: nn.Module) -> str | None:
    """Which attribute holds a drop-path site's rate, or None if ``module`` is not a site."""
    if isinstance(module, DropPath | Residual) or is_layer_drop_site(module):
        return "p"
    name = type(module).__name__
    if name == "StochasticDepth" and hasattr(module, "p") and hasattr(module, "mode"):
        return "p"
    if name.endswith("DropPath") and hasattr(module, "drop_prob"):
        return "drop_prob"
    return None


def drop_path_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every drop-path site of ``model``, in module registration (forward) order.

    Examples:
        >>> from torch import nn
        >>> from droppath import DropPath, Residual, drop_path_sites
        >>> model = nn.Sequential(Residual(nn.Linear(4, 4)), nn.ReLU(), DropPath())
        >>> [name for name, _ in drop_path_sites(model)]
        ['0', '2']
    """
    return [(name, m) for name, m in model.named_modules() if _kind(m) is not None]


def is_drop_path_site(module: nn.Module) -> bool:
    """Whether ``module`` is a drop-path site (one that ``drop_path_sites`` lists)."""
    return _kind(module) is not None


# The attributes where timm, torchvision and Hugging Face keep a block's drop-path module; when a
# block's rate is 0 they hold ``nn.Identity`` (timm, Hugging Face, torchvision's MaxViT) or None
# (timm's ResNet): an empty slot, where a site can be put.
_SLOT_NAME = re.compile(r"(drop_path|stochastic_depth|stochastic_dropout)\d*")
_CONTAINERS = (nn.Sequential, nn.ModuleList)


def empty_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The empty drop-path slots of ``model``: ``(qualified name, owner module, attribute)``.

    A slot is an attribute named ``drop_path*``, ``stochastic_depth*`` or ``stochastic_dropout``
    that holds ``nn.Identity`` or None, where the libraries put no module for a rate of 0.
    """
    found = []
    for owner_name, owner in model.named_modules():
        if isinstance(owner, _CONTAINERS):
            continue
        attrs = [(k, v) for k, v in owner._modules.items()]
        attrs += [(k, v) for k, v in vars(owner).items() if v is None]
        for attr, value in attrs:
            if _SLOT_NAME.fullmatch(attr) and (value is None or type(value) is nn.Identity):
                found.append((f"{owner_name}.{attr}" if owner_name else attr, owner, attr))
    return found


def _block_of(model: nn.Module, name: str, module: nn.Module | None) -> str:
    """The block a site (or empty slot) ``name`` belongs to, for its depth position.

    Libraries give one rate per block (a ViT block's two residuals share it; a MaxViT layer's three
    sub-blocks too). A block is the nearest module, from the site's owner up, that stands in an
    ``nn.Sequential`` or ``nn.ModuleList`` of modules of its own class (a stack of blocks); the
    owner is the site itself when it is a residual block of its own (``Residual``, a layer-drop
    layer) or an element of a container, else the module holding it. Without such a stack, the
    owner is the block.
    """
    parts = name.split(".") if name else []
    stands_alone = module is not None and (
        isinstance(module, Residual) or is_layer_drop_site(module)
    )
    parent = model.get_submodule(".".join(parts[:-1])) if parts else None
    if not stands_alone and not isinstance(parent, _CONTAINERS):
        parts = parts[:-1]
    owner = parts
    while parts:
        container = model.get_submodule(".".join(parts[:-1]))
        here = model.get_submodule(".".join(parts))
        if isinstance(container, _CONTAINERS) and all(
            type(m) is type(here) for m in container.children()
        ):
            return ".".join(parts)
        parts = parts[:-1]
    return ".".join(owner)


def site_positions(model: nn.Module, names: Sequence[str]) -> tuple[list[int], int]:
    """The depth position of each site in ``names`` and the number of positions of ``model``.

    Positions are blocks (see ``_block_of``), counted in forward order, blocks whose slot is empty
    included: with them, ``depth_rates`` gives exactly what the libraries compute at build time.
    """
    modules = dict(model.named_modules())
    everything = [*names, *(n for n, _ in drop_path_sites(model))]
    everything += [name for name, _, _ in empty_slots(model)]
    blocks = {name: _block_of(model, name, modules.get(name)) for name in everything}
    order = {name: i for i, name in enumerate(modules)}
    every = sorted(set(blocks.values()), key=lambda b: order.get(b, -1))
    index = {block: i for i, block in enumerate(every)}
    return [index[blocks[name]] for name in names], len(every)


def site_rate(site: nn.Module) -> float:
    """The drop rate a site holds now (0 for a timm ``DropPath`` built with ``drop_prob=None``).

    Examples:
        >>> from droppath import DropPath
        >>> from droppath.sites import site_rate
        >>> site_rate(DropPath(0.2))
        0.2
    """
    return float(getattr(site, _kind(site) or "p", 0.0) or 0.0)


def set_site_rate(site: nn.Module, rate: float) -> None:
    """Set the drop rate of ``site`` in the attribute its library keeps it in (``p`` or
    ``drop_prob``); droppath's own modules check it there."""
    setattr(site, _kind(site) or "p", rate)


def _is_rates(p: Any) -> bool:
    return isinstance(p, Sequence) and not isinstance(p, str)


def _resolve_rates(
    model: nn.Module, sites: Sequence[tuple[str, nn.Module]], p: float | Sequence[float], rule: str
) -> list[float]:
    """One rate per site: ``p`` itself if it is a sequence; by ``"model"``, each site's own rate
    scaled; else the rate of the site's block."""
    if isinstance(p, Sequence) and not isinstance(p, str):
        return resolve_rates(len(sites), p, rule)
    profile = [site_rate(m) for _, m in sites] if rule == MODEL_RULE else None
    rule = positional_rule(check_choice(rule, "rule", DEPTH_RULES), profile)
    if rule == MODEL_RULE:
        return depth_rates(len(sites), p, rule, profile=profile)
    positions, n = site_positions(model, [name for name, _ in sites])
    rates = depth_rates(n, p, rule)
    return [rates[i] for i in positions]


# What droppath looks for in a model, for the message of a call that finds nothing.
_SEARCHED = (
    "drop-path modules (droppath's DropPath, Residual and layer-drop layers, timm's DropPath, "
    "torchvision's StochasticDepth, Hugging Face's *DropPath) and empty drop-path slots "
    "(attributes drop_path*, stochastic_depth* or stochastic_dropout holding nn.Identity or None)"
)


def check_reaches(model: nn.Module, p: Any, action: str) -> None:
    """Refuse a ``p`` above 0 that reaches nothing in ``model``, and warn about any other call
    (``p`` None or 0) that has nothing to act on: a silent no-op would train a model without
    stochastic depth. ``p`` (None, a rate or a sequence of rates) is checked first."""
    if p is None:
        rates = []
    elif _is_rates(p):
        rates = [check_probability(v, f"p[{i}]") for i, v in enumerate(p)]
    else:
        rates = [check_probability(p)]
    if drop_path_sites(model) or empty_slots(model):
        return
    found = (
        f"{action} found nothing to act on in this {type(model).__name__}: it looked for "
        f"{_SEARCHED}"
    )
    if any(r > 0.0 for r in rates):
        raise ValueError(f"p={p!r} reaches no drop-path site: {found}")
    warn(f"{found}; nothing was changed")


def fill_slots(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Put a ``droppath.DropPath(0.0)`` in the empty slots ``names`` (default: all) of ``model``.

    The forwards of timm, torchvision and Hugging Face call the slot's module (or skip it when it is
    None), so the block gains a drop-path site; ``state_dict()`` keys are unchanged (the module has
    no parameters and no buffers). Returns the names filled.
    """
    filled = []
    for name, owner, attr in empty_slots(model):
        if names is None or name in names:
            if attr in owner._modules:
                owner._modules[attr] = DropPath(0.0).train(owner.training)
            else:
                delattr(owner, attr)
                owner.add_module(attr, DropPath(0.0).train(owner.training))
            filled.append(name)
    return filled


def _fill_where_dropping(model: nn.Module, p: float | Sequence[float], rule: str) -> None:
    """Fill the empty slots that ``p`` and ``rule`` give a rate above 0 (none where ``"model"``
    keeps the profile of a model that has one: its empty slots have rate 0 in it)."""
    if _is_rates(p):
        return
    p = check_probability(p)
    check_choice(rule, "rule", DEPTH_RULES)
    if rule == MODEL_RULE:
        rule = positional_rule(rule, [site_rate(m) for _, m in drop_path_sites(model)])
        if rule == MODEL_RULE:
            return
    slots = [name for name, _, _ in empty_slots(model)]
    if slots and p > 0.0:
        positions, n = site_positions(model, slots)
        rates = depth_rates(n, p, rule)
        fill_slots(model, [s for s, i in zip(slots, positions, strict=True) if rates[i] > 0.0])


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
    check_choice(rule, "rule", DEPTH_RULES)
    check_reaches(model, p, "set_drop_rates")
    sites, rates = _plan(model, p, rule)
    for (_, site), rate in zip(sites, rates, strict=True):
        set_site_rate(site, rate)
    return [(name, rate) for (name, _), rate in zip(sites, rates, strict=True)]


def resolve_site_rates(
    model: nn.Module, p: float | Sequence[float], rule: str
) -> list[tuple[str, float]]:
    """The rate ``p`` and ``rule`` give each drop-path site of ``model``, set on none of them:
    what ``set_drop_rates`` sets, for ``p`` and ``rule`` as there.

    The empty slots that get a rate above 0 are filled first (with ``DropPath(0.0)``), so the
    sites listed are those of the model after the call, in forward order.
    """
    sites, rates = _plan(model, p, rule)
    return [(name, rate) for (name, _), rate in zip(sites, rates, strict=True)]


def _plan(
    model: nn.Module, p: float | Sequence[float], rule: str
) -> tuple[list[tuple[str, nn.Module]], list[float]]:
    _fill_where_dropping(model, p, rule)
    sites = drop_path_sites(model)
    return sites, _resolve_rates(model, sites, p, rule)


class _Converted(DropPath):
    """``DropPath`` mixed with the class of the library module it replaced (``convert``)."""

    __repr__ = nn.Module.__repr__  # not torchvision's own, which hides droppath's settings


class _ConvertedDropProb(_Converted):
    """For timm's and Hugging Face's: ``drop_prob`` is ``p`` (as timm-style scripts set it)."""

    @property
    def drop_prob(self) -> float:
        return self.p

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self.p = check_probability(value, "drop_prob")


def _replacement(module: nn.Module) -> DropPath | None:
    if isinstance(module, DropPath | Residual) or is_layer_drop_site(module):
        return None
    kind = _kind(module)
    if kind is None:
        return None
    attrs: dict[str, Any] = vars(module)
    if kind == "drop_prob":  # timm and Hugging Face: per-sample, scaled by the keep rate
        scale = attrs.get("scale_by_keep", True)
        new = DropPath(float(attrs["drop_prob"] or 0.0), scale_by_keep=bool(scale))
        mixin: type = _ConvertedDropProb
    else:  # torchvision: scales when p < 1
        new, mixin = DropPath(float(attrs["p"]), mode=str(attrs["mode"])), _Converted
    with contextlib.suppress(TypeError):  # a class that cannot be mixed (slots): DropPath alone
        new.__class__ = mixed_class(mixin, type(module))  # still an instance of the library's
    return new


def convert(model: nn.Module) -> nn.Module:
    """Replace timm's, torchvision's and Hugging Face's drop-path modules by ``droppath.DropPath``.

    Each replacement has the same rate, mode and scaling, so the model computes the same
    distribution; everything else is left untouched. A replacement is an instance of both
    ``DropPath`` and the library's class, under its name (``isinstance(site, timm.layers.DropPath)``
    holds), and timm's and Hugging Face's ``drop_prob`` is its ``p``, checked when set. The model
    is changed in place and returned (the replacement itself if ``model`` is such a module).

    Examples:
        >>> from torch import nn
        >>> from droppath import DropPath, convert
        >>> class StochasticDepth(nn.Module):  # torchvision's class, as far as convert can tell
        ...     def __init__(self, p, mode):
        ...         super().__init__()
        ...         self.p, self.mode = p, mode
        >>> model = convert(nn.Sequential(nn.Linear(2, 2), StochasticDepth(0.1, "row")))
        >>> model
        Sequential(
          (0): Linear(in_features=2, out_features=2, bias=True)
          (1): StochasticDepth(p=0.1, mode='row', batch_dim=0, scale_by_keep=True)
        )
        >>> isinstance(model[1], DropPath), isinstance(model[1], StochasticDepth)
        (True, True)
    """
    check_model(model, "convert")
    return _convert(model)


def _convert(model: nn.Module) -> nn.Module:
    root = _replacement(model)
    if root is not None:
        return root.train(model.training)
    for name, child in list(model.named_children()):
        new = _replacement(child)
        if new is not None:
            setattr(model, name, new.train(child.training))
        else:
            _convert(child)
    return model
