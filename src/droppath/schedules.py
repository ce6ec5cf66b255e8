"""Drop-rate schedules across depth and over training, applied to any model.

Drop-path sites are found by duck typing, without importing the libraries that define them:
droppath's ``DropPath`` and ``Residual``; timm's ``DropPath`` (attribute ``drop_prob``);
torchvision's ``StochasticDepth`` (attributes ``p`` and ``mode``); and the ``*DropPath`` classes
of Hugging Face transformers (attribute ``drop_prob``).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from droppath._checks import (
    check_choice,
    check_int,
    check_model,
    check_positive_int,
    check_probability,
)
from droppath.drop import DropPath
from droppath.layerdrop import (
    SkippedLayer,
    find_layer_stack,
    is_layer_drop_site,
    layer_output_template,
)
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
    "DEFAULT_RULE",
    "DEPTH_RULES",
    "TIME_RULES",
    "TIME_RULE_TABLE",
    "DropRateScheduler",
    "convert",
    "depth_rates",
    "drop_path_sites",
    "empty_slots",
    "fill_slots",
    "prune",
    "set_drop_rates",
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


def _rate(site: nn.Module) -> float:
    """The drop rate a site holds now (0 for a timm ``DropPath`` built with ``drop_prob=None``)."""
    return float(getattr(site, _kind(site) or "p", 0.0) or 0.0)


def _is_rates(p: Any) -> bool:
    return isinstance(p, Sequence) and not isinstance(p, str)


def _resolve_rates(
    model: nn.Module, sites: Sequence[tuple[str, nn.Module]], p: float | Sequence[float], rule: str
) -> list[float]:
    """One rate per site: ``p`` itself if it is a sequence; by ``"model"``, each site's own rate
    scaled; else the rate of the site's block."""
    if isinstance(p, Sequence) and not isinstance(p, str):
        return resolve_rates(len(sites), p, rule)
    profile = [_rate(m) for _, m in sites] if rule == MODEL_RULE else None
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
    warnings.warn(f"{found}; nothing was changed", UserWarning, stacklevel=3)


def _apply(sites: Sequence[tuple[str, nn.Module]], rates: Sequence[float]) -> None:
    for (_, module), rate in zip(sites, rates, strict=True):
        setattr(module, _kind(module) or "p", rate)


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
        rule = positional_rule(rule, [_rate(m) for _, m in drop_path_sites(model)])
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
            :func:`drop_path_sites`.
        p: the largest rate for ``rule`` (see :func:`depth_rates`), or an explicit sequence with
            one rate per site (empty slots excluded).
        rule: a depth rule of :func:`depth_rates`. Default: ``"model"``.

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
    _fill_where_dropping(model, p, rule)
    sites = drop_path_sites(model)
    rates = _resolve_rates(model, sites, p, rule)
    _apply(sites, rates)
    return [(name, rate) for (name, _), rate in zip(sites, rates, strict=True)]


def _replacement(module: nn.Module) -> DropPath | None:
    if isinstance(module, DropPath | Residual) or is_layer_drop_site(module):
        return None
    kind = _kind(module)
    if kind is None:
        return None
    if kind == "drop_prob":  # timm and Hugging Face: per-sample, scaled by the keep rate
        attrs: dict[str, Any] = vars(module)
        scale = attrs.get("scale_by_keep", True)
        return DropPath(float(attrs["drop_prob"] or 0.0), scale_by_keep=bool(scale))
    attrs = vars(module)
    return DropPath(float(attrs["p"]), mode=str(attrs["mode"]))  # torchvision: scales when p < 1


def convert(model: nn.Module) -> nn.Module:
    """Replace timm's, torchvision's and Hugging Face's drop-path modules by ``droppath.DropPath``.

    Each replacement has the same rate, mode and scaling, so the model computes the same
    distribution; everything else is left untouched. The model is changed in place and returned
    (the replacement itself if ``model`` is such a module).

    Examples:
        >>> from torch import nn
        >>> from droppath import convert
        >>> class StochasticDepth(nn.Module):  # torchvision's class, as far as convert can tell
        ...     def __init__(self, p, mode):
        ...         super().__init__()
        ...         self.p, self.mode = p, mode
        >>> convert(nn.Sequential(nn.Linear(2, 2), StochasticDepth(0.1, "row")))
        Sequential(
          (0): Linear(in_features=2, out_features=2, bias=True)
          (1): DropPath(p=0.1, mode='row', batch_dim=0, scale_by_keep=True)
        )
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


_REQUIRED: Any = object()


@dataclass(frozen=True)
class RuleOption:
    """An option of a time rule: its name, how a value is checked and converted (the check's
    error names the option), its default (``_REQUIRED`` if none), and its type on the command
    line (the flag is ``--`` + the name with dashes)."""

    name: str
    parse: Callable[[Any], Any]
    cli_type: type
    default: Any = _REQUIRED
    help: str = ""


@dataclass(frozen=True)
class TimeRule:
    """A time rule of :class:`DropRateScheduler`: ``factor(step, options)`` multiplies the depth
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


_CUTOFF = RuleOption(
    "cutoff_step",
    lambda v: check_positive_int(v, "cutoff_step", minimum=0),
    int,
    help="the step where the rule switches (early, late)",
)

# The time rules: everything about a rule is here, and the scheduler's checks, the command
# line's flags and their messages are derived from this table.
TIME_RULE_TABLE: dict[str, TimeRule] = {
    rule.name: rule
    for rule in (
        TimeRule("constant", lambda step, o: 1.0),
        TimeRule(
            "warmup",
            lambda step, o: min(1.0, step / o["warmup_steps"]),
            (
                RuleOption(
                    "warmup_steps",
                    lambda v: check_positive_int(v, "warmup_steps"),
                    int,
                    help="steps to reach the full rates (warmup)",
                ),
            ),
        ),
        TimeRule(
            "early",
            _early,
            (
                _CUTOFF,
                RuleOption(
                    "shape",
                    lambda v: check_choice(v, "shape", ("linear", "constant")),
                    str,
                    default="linear",
                    help="linear or constant rate before the cutoff (early; default: linear)",
                ),
            ),
        ),
        TimeRule("late", lambda step, o: 1.0 if step >= o["cutoff_step"] else 0.0, (_CUTOFF,)),
        TimeRule(
            "pld",
            _pld,
            (
                RuleOption("theta_bar", _parse_theta_bar, float, help="final keep ratio (pld)"),
                RuleOption("gamma", _parse_gamma, float, help="decay rate, > 0 (pld)"),
            ),
        ),
    )
}
TIME_RULES = tuple(TIME_RULE_TABLE)


def time_rule_options() -> dict[str, RuleOption]:
    """Every option of every time rule, by name (the command line's flags)."""
    return {o.name: o for rule in TIME_RULE_TABLE.values() for o in rule.options}


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
    missing = [o.name for o in spec.options if o.default is _REQUIRED and o.name not in options]
    if missing:
        raise ValueError(f"time_rule={rule!r} needs the option(s) {', '.join(missing)}")
    return {o.name: o.parse(options.get(o.name, o.default)) for o in spec.options}


class DropRateScheduler:
    """Set the drop rates of a model's drop-path sites by depth and by training step.

    In the style of ``torch.optim.lr_scheduler``: construct it once (it sets the rates of step 0),
    call :meth:`step` once per training iteration, and save :meth:`state_dict` with the checkpoint.
    The rate of a site at step ``t`` is its base rate times ``f(t)``. The base rates are what
    :func:`set_drop_rates` gives for ``p`` and ``depth_rule``, read from the model once, at
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
    the modules that run even when :func:`droppath.accelerate` or :func:`convert` replaces them
    after it was built.

    Args:
        model: the model whose sites (see :func:`drop_path_sites`) are scheduled; not a traced
            ``torch.fx.GraphModule``.
        p: the largest rate for the depth rule, or one rate per site.
        depth_rule: see :func:`depth_rates`. Default: ``"model"``.
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
        check_choice(depth_rule, "depth_rule", DEPTH_RULES)
        check_reaches(model, p, "DropRateScheduler")
        _fill_where_dropping(model, p, depth_rule)
        self.model = model
        sites = drop_path_sites(model)
        self.site_names = [name for name, _ in sites]
        self.base_rates = _resolve_rates(model, sites, p, depth_rule)
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
        self._update()

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
        if module is None or _kind(module) is None:
            now = type(module).__name__ if module is not None else "nothing"
            raise RuntimeError(
                f"drop-path site {name!r} of the scheduled {type(self.model).__name__} is gone "
                f"(the model holds {now} there): build the DropRateScheduler again after "
                "changing the model's structure (prune, or replacing modules)"
            )
        return module

    def _update(self) -> None:
        self._last_p = self.rates_at(self.last_step)
        _apply(self.sites, self._last_p)

    def step(self) -> None:
        """Advance one training step and set the rates for it."""
        self.last_step += 1
        self._update()

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
        self.last_step = check_int(state["last_step"], "last_step")
        self._update()

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"{type(self).__name__}(sites={len(self.site_names)}, depth_rule={self.depth_rule!r}, "
            f"time_rule={self.time_rule!r}{opts}, last_step={self.last_step})"
        )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pruned(block: nn.Module) -> nn.Module:
    """What a removed block becomes: what it computes when its branch or layer is dropped."""
    if isinstance(block, Residual):
        return block.shortcut if block.shortcut is not None else nn.Identity()
    return SkippedLayer(layer_output_template(block))


def _hf_stack(model: nn.Module) -> tuple[str, nn.ModuleList, Any] | None:
    """The layer stack of a Hugging Face decoder-only model and the config that counts it
    (``num_hidden_layers`` equal to its length), or None: layers pruned from it are removed from
    the list and the config, so that ``save_pretrained`` writes a model that loads as pruned."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or getattr(config, "is_encoder_decoder", False):
        return None
    try:
        name, stack = find_layer_stack(model)
    except ValueError:
        return None
    return (name, stack, config) if len(stack) == n else None


def _remove_layers(stack: nn.ModuleList, config: Any, removed: set[int]) -> None:
    """Delete layers ``removed`` from ``stack``, renumber the ``layer_idx`` that the remaining
    layers (and their attention) index the key/value cache with, and update ``config``: its
    layer count and each per-layer list (a list attribute with "layer" in its name and one entry
    per layer, such as ``layer_types``)."""
    n = len(stack)
    kept = [i for i in range(n) if i not in removed]
    for new, old in enumerate(kept):
        for module in stack[old].modules():
            if getattr(module, "layer_idx", None) == old:
                setattr(module, "layer_idx", new)  # noqa: B010 (mypy: not a Module or Tensor)
    for i in sorted(removed, reverse=True):
        del stack[i]
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, list | tuple) and len(value) == n:
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)


def prune(model: nn.Module, k: int) -> dict[str, Any]:
    """Remove for good the ``k`` ``Residual`` blocks or layer-drop layers with the highest rate.

    Each removed block becomes its shortcut alone (``nn.Identity`` when it has none), and a layer
    a ``SkippedLayer`` that returns its input: what they compute when dropped. A model trained
    with stochastic depth keeps working, cheaper, at inference (Fan et al., "Reducing Transformer
    Depth on Demand with Structured Dropout", ICLR 2020). Ties go to the deeper block.

    Layers of a Hugging Face decoder-only model (the stack :func:`droppath.layer_drop` finds,
    counted by ``config.num_hidden_layers``) are deleted from their ``nn.ModuleList`` instead: the
    remaining layers are renumbered (state-dict keys and the ``layer_idx`` of the key/value cache),
    and the config's layer count and per-layer lists (``layer_types``, ...) follow, so that
    ``save_pretrained`` writes the pruned model and ``from_pretrained`` loads it back as it is.
    Only droppath's ``Residual`` blocks and layer-drop layers can be pruned: drop paths inside
    other blocks (timm's, or those :func:`droppath.accelerate` runs) cannot.

    Args:
        model: a model containing ``droppath.Residual`` blocks or layer-drop sites; changed in
            place.
        k: how many blocks to remove, from 0 to the number of blocks.

    Returns:
        ``{"blocks_removed": [names], "parameters_removed": int, "parameters_left": int}``, the
        names as they were before the call.

    Examples:
        >>> from torch import nn
        >>> from droppath import Residual, prune, set_drop_rates
        >>> model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(4)])
        >>> _ = set_drop_rates(model, 0.5, rule="linear")
        >>> prune(model, 2)
        {'blocks_removed': ['3', '2'], 'parameters_removed': 40, 'parameters_left': 40}
        >>> model[3]
        Identity()
    """
    check_model(model, "prune")
    blocks = [
        (name, m)
        for name, m in model.named_modules()
        if name and (isinstance(m, Residual) or is_layer_drop_site(m))
    ]
    k = check_positive_int(k, "k", minimum=0)
    if k > len(blocks):
        if not blocks:
            others = sorted({type(m).__name__ for _, m in drop_path_sites(model)})
            has = f"drop-path modules ({', '.join(others)}) inside its blocks" if others else "none"
            raise ValueError(
                f"k must be 0 for this {type(model).__name__}, got {k}: prune removes only "
                f"droppath Residual blocks and layer-drop layers (layer_drop), and it has "
                f"neither (it has {has})"
            )
        raise ValueError(f"k must be in [0, {len(blocks)}] for this model, got {k}")
    order = sorted(range(len(blocks)), key=lambda i: (-blocks[i][1].p, -i))
    before = _count(model)
    hf = _hf_stack(model)
    from_stack: set[int] = set()
    removed = []
    for i in order[:k]:
        name, block = blocks[i]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if hf is not None and parent is hf[1]:
            from_stack.add(int(attr))
        else:
            setattr(parent, attr, _pruned(block))
        removed.append(name)
    if hf is not None and from_stack:
        _remove_layers(hf[1], hf[2], from_stack)
    after = _count(model)
    return {
        "blocks_removed": removed,
        "parameters_removed": before - after,
        "parameters_left": after,
    }
