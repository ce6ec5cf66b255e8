"""``accelerate``: skip the dropped work inside timm, torchvision and Hugging Face models."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from droppath._checks import STRATEGIES, check_choice, check_model
from droppath._derive import (
    NOTHING_TO_SKIP,
    Derived,
    DeriveError,
    derive_candidates,
    verify,
)
from droppath._derive.ops import by_products_asked
from droppath._derive.state import block_state
from droppath._engine import DropBase, host_side
from droppath._fx import is_proxy
from droppath._swap import own_class, swap_class, unswap_class
from droppath._warn import warn
from droppath.drop import DropPath
from droppath.layerdrop import is_layer_drop_site, layer_drop_spec
from droppath.rates import DEFAULT_RULE, DEPTH_RULES, Rates
from droppath.report import BATCH, MASK, ROW, AccelerationReport, SiteReport
from droppath.residual import Residual
from droppath.site_rates import check_reaches, plan_rates, write_rates
from droppath.sites import SiteTable, convert, fill_slots, site_rate

__all__ = ["AccelerationReport", "SiteReport", "accelerate"]

BATCHNORM_CHOICES = ("mask", "subset")


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _AcceleratedBlock:
    """Mixed into a block's class by ``accelerate``: in training, while a site of the block has
    a rate above 0, the block runs the forward derived from its class's (the dropped work
    skipped), once that forward has been verified on the block; otherwise its own ``forward``,
    untouched."""

    _droppath_derived: Derived  # the rewrite (candidates[0])
    _droppath_candidates: tuple[Derived, ...]  # the rewrites to check, in order
    _droppath_sites: tuple[str, ...]
    training: bool

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training or any(map(is_proxy, (*args, *kwargs.values()))):
            # evaluation, and torch.fx tracing: the block's own forward, whose drop-path
            # modules become nodes of their own (the mask; see droppath._fx)
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        state = block_state(self)
        if state.ahead:  # droppath.draw_ahead: no host-side step, so one compiled graph
            if state.failed:
                return super().forward(*args, **kwargs)  # type: ignore[misc]
            if state.verified:
                traced = self._droppath_candidates[state.chosen].traced
                if traced is not None:
                    return traced(self, *args, **kwargs)
        return _train_forward(self, args, kwargs)


def accelerated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` that ``accelerate`` rewrote."""
    return [m for m in model.modules() if isinstance(m, _AcceleratedBlock)]


def check_states(model: nn.Module) -> dict[str, str]:
    """How far each accelerated block of ``model`` is with its check, by module name:
    ``"verified"`` (it runs its derived forward), ``"pending"`` (not checked yet: no training
    call that could tell so far) or ``"failed: <reason>"`` (it stays on the mask)."""
    states = {}
    for name, m in model.named_modules():
        if isinstance(m, _AcceleratedBlock):
            state = block_state(m)
            failed, verified = state.failed, state.verified
            states[name] = f"failed: {failed}" if failed else "verified" if verified else "pending"
    return states


def block_sites(block: nn.Module) -> list[nn.Module]:
    """The drop-path modules of an accelerated block's derived sites."""
    return [getattr(block, s) for s in getattr(block, "_droppath_sites", ())]


def set_ahead(block: nn.Module, on: bool) -> None:
    """Mark an accelerated block as drawn ahead (``droppath.draw_ahead``), or not."""
    block_state(block).ahead = on


def recheck(block: nn.Module) -> None:
    """Forget an accelerated block's check: it checks again on its next training call."""
    block_state(block).forget_check()


def unchecked(block: nn.Module) -> bool:
    """Whether an accelerated block has still to check its derived forward."""
    state = block_state(block)
    return not state.verified and not state.failed


@contextmanager
def checking_now(model: nn.Module) -> Iterator[None]:
    """The accelerated blocks of ``model`` check their derived forward on their next training
    call, even where every rate is 0 (``droppath.check``, and ``droppath.draw_ahead`` before the
    first compiled step)."""
    states = [block_state(b) for b in accelerated_blocks(model)]
    for state in states:
        state.check_now = True
    try:
        yield
    finally:
        for state in states:
            state.check_now = False


@host_side
def _train_forward(block: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The training forward of an accelerated block, run on the host under torch.compile: the
    rates are read here, so no graph guards on them (see ``droppath._engine.host_side``)."""
    candidates = block._droppath_candidates
    original = _base(block).forward
    state = block_state(block)
    derived = candidates[state.chosen]
    idle = all(float(getattr(getattr(block, s), "p", 0.0)) == 0.0 for s in derived.sites)
    # attention weights asked for: every sample through the block's own forward
    if state.failed or (idle and not state.check_now) or by_products_asked(kwargs):
        return original(block, *args, **kwargs)
    if not state.verified:
        reason = _choose(block, original, args, kwargs)
        if reason is None:  # these inputs cannot tell (a single sample): check on a later call
            return original(block, *args, **kwargs)
        if reason:
            state.failed = reason
            warn(
                f"droppath.accelerate: {_key(_base(block))} stays on the mask ("
                f"{reason.splitlines()[0]})"
            )
            return original(block, *args, **kwargs)
        state.verified = True
        derived = candidates[state.chosen]
    return derived.forward(block, *args, **kwargs)


def _choose(block: Any, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Check the block's derived forwards on these inputs, in order, and keep the first that
    agrees with ``original``: "" then, the first failure's reason if none does, None if the
    inputs cannot tell. Side inputs of 3 or more dimensions with the batch size are per sample;
    if a check fails so, 2-dimensional ones too
    (a (batch, tokens) mask; see droppath._derive.ops)."""
    state = block_state(block)
    first = None
    for i, derived in enumerate(block._droppath_candidates):
        for min_dims in (3, 2):
            state.gather = min_dims
            with torch.set_grad_enabled(torch.is_grad_enabled() or state.check_now):  # asked for
                reason = verify(block, original, derived.forward, derived.sites, args, kwargs)
            if reason is None:
                return None
            if not reason:
                state.chosen = i
                return ""
            first = first or reason
    return first


def _namespace(cls: type, sites: tuple[str, ...]) -> dict[str, Any]:
    """The class attributes of ``cls`` accelerated at ``sites`` (see ``droppath._swap``)."""
    candidates = derive_candidates(cls, sites)
    return {
        "_droppath_derived": candidates[0],
        "_droppath_candidates": candidates,
        "_droppath_sites": sites,
    }


def _base(block: nn.Module) -> type[nn.Module]:
    """The block's own class (under the class that ``accelerate`` mixed in, if any)."""
    base: type[nn.Module] = own_class(block, _AcceleratedBlock)
    return base


def _mixes_samples(block: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())


def _plan(block: nn.Module, sites: list[str], batchnorm: str) -> tuple[Derived | None, str]:
    """The derived forward to run ``block`` with, or None and the reason it stays on the mask."""
    cls = _base(block)
    if not all(isinstance(getattr(block, s, None), DropPath) for s in sites):
        return None, f"{cls.__qualname__} holds a module droppath cannot read at a site"
    batch_only = all(getattr(block, s).mode == "batch" for s in sites)
    if batchnorm == "mask" and _mixes_samples(block) and not batch_only:
        return None, "branch mixes samples (BatchNorm); batchnorm='subset' to run kept rows"
    try:
        derived = derive_candidates(cls, tuple(sorted(sites)))[0]
    except DeriveError as error:
        return None, str(error)
    return derived, ""


def _unreached(cls: type, attr: str, derived: Derived) -> str:
    """Why a site of a derived block is not rewritten."""
    if f"self.{attr}(" in derived.source:
        return f"rewrite: {NOTHING_TO_SKIP}"
    return f"rewrite: {cls.__qualname__}.forward does not call {attr}"


def _check(model: Any, p: Any, rule: Any, batchnorm: Any, strategy: Any) -> Rates | None:
    """Check ``accelerate``'s arguments; the rates asked for, once checked (None: none)."""
    check_model(model, "accelerate")
    rates = None
    if p is not None:
        rates = Rates.of(p, rule)  # checks the rule too
    else:
        check_choice(rule, "rule", DEPTH_RULES)
    check_choice(batchnorm, "batchnorm", BATCHNORM_CHOICES)
    if strategy is not None:
        check_choice(strategy, "strategy", STRATEGIES)
    return rates


def accelerate(
    model: nn.Module,
    p: float | Sequence[float] | None = None,
    rule: str = DEFAULT_RULE,
    *,
    batchnorm: str = "mask",
    strategy: str | None = None,
) -> AccelerationReport:
    """Make any model, timm's, torchvision's, Hugging Face's or yours, skip the work that
    stochastic depth drops.

    In place, in one call:

    1. The model's drop-path modules become ``droppath.DropPath`` with the same rate, mode and
       scaling (``convert``), and its empty slots (``nn.Identity`` or None where the library
       put no module for a rate of 0) receive a ``DropPath(0.0)``: a model built with
       ``drop_path_rate=0`` can be given stochastic depth. With ``p``, the rates are set by
       ``rule`` (``set_drop_rates``): by default the model's own profile scaled to ``p``,
       or ``"linspace"``, what the libraries compute, for a model built with rate 0. A ``p``
       above 0 on a model with no drop-path module and no empty slot raises ``ValueError``;
       without one, such a model gets a warning.
    2. Each block that holds sites gets a training forward derived from its class's installed
       source (``droppath._derive``): each residual ``a + drop_path(g(x))``, whatever its form
       (an expression, the statements since the shortcut was taken, under an ``if``, a layer
       scale after the site), runs as ``drop_add_residual`` does: ``g`` on the kept samples
       only (row mode) or not at all when a step is dropped (batch mode), with the site's own
       rate, mode and scaling, decisions drawn on the host and zero gradients for skipped
       parameters, as the mask gives them. Side inputs with one row per sample (attention masks,
       rotary tables) are gathered with the kept rows; shared ones are passed whole.
    3. Nothing derived is trusted untried: on a block's first training call with a rate above 0,
       the derived forward runs against the class's own under the same keep decisions, and
       outputs and input gradients must agree. A block that fails the check warns once and stays
       on the mask; one whose source cannot be read or rewritten stays on the mask and the report
       says why. In evaluation, and while all of a block's rates are 0, the block runs its own
       ``forward``: outputs are bit-identical to the original's. Branches that mix samples
       (BatchNorm in training) stay on the mask unless ``batchnorm="subset"`` (their batch
       statistics then come from the kept samples only).

    The blocks keep their class names, parameters and buffers: ``state_dict()`` keys and
    ``named_parameters()`` are unchanged, checkpoints load both ways with ``strict=True``, an
    optimizer built before the call stays valid, and ``set_drop_rates``, ``DropRateScheduler`` and
    ``convert`` see the same site names. Calling it again changes the settings.

    Args:
        model: a model of timm, torchvision or Hugging Face transformers (or any module).
        p: the largest rate for ``rule``, or one rate per site; None keeps the model's rates.
            Default: None.
        rule: a depth rule of ``depth_rates``: ``"model"`` keeps the model's own profile
            scaled to ``p`` (``"linspace"`` where its rates are all 0); the positional rules go
            over blocks (empty slots included), and with ``"linspace"`` the rates are timm's,
            torchvision's and transformers'; EfficientNet's are ``"efficientnet"``. Default:
            ``"model"``.
        batchnorm: ``"mask"`` or ``"subset"``, how to run branches with BatchNorm in training.
            Default: ``"mask"``.
        strategy: the row-mode strategy of every site (layer-drop sites aside): ``"auto"``
            (the row subset or the mask, chosen per site from what each costs, measured on its
            first training calls), ``"subset"`` or ``"mask"``; None keeps each site's own (a
            converted library module's is ``"auto"``). Default: None.

    Returns:
        An ``AccelerationReport``: for every site, its name, rate and how it runs.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from droppath import accelerate
        >>> class Block(nn.Module):  # your own block, or a library's
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin, self.drop_path = nn.Linear(4, 4), nn.Identity()
        ...     def forward(self, x):
        ...         shortcut = x
        ...         x = self.lin(x).relu()
        ...         return self.drop_path(x) + shortcut
        >>> model = nn.Sequential(Block(), Block())  # built with rate 0: empty slots
        >>> report = accelerate(model, p=0.2)  # fills them; all rates 0, so linspace
        >>> print(report)
        site         block  rate  runs        reason
        0.drop_path  Block  0     row subset
        1.drop_path  Block  0.2   row subset
        2 sites: 2 row subset, 0 batch skip, 0 mask
        >>> model[1].drop_path
        DropPath(p=0.2, mode='row', batch_dim=0, scale_by_keep=True)
        >>> print(type(model[1])._droppath_derived.source)  # what runs in training
        def __droppath_factory(__droppath_add, __droppath_radd, __droppath_rows, __droppath_cls):
        <BLANKLINE>
            def __droppath_branch_0(self, x):
                x = self.lin(x).relu()
                return x
        <BLANKLINE>
            def forward(self, x):
                shortcut = x
                return __droppath_radd(self, 'drop_path', shortcut, __droppath_branch_0, (x,))
            return forward
        >>> y = model.train()(torch.randn(8, 4))  # checks it on the first call, then uses it
        >>> from droppath.acceleration import check_states
        >>> check_states(model)  # the block at rate 0 runs its own forward, unchecked
        {'0': 'pending', '1': 'verified'}
    """
    rates = _check(model, p, rule, batchnorm, strategy)
    model = convert(model)
    fill_slots(model)
    table = SiteTable.of(model)  # the one walk of the model's sites, passed down
    # rates that reach nothing raise, a call without rates that reaches nothing warns
    check_reaches(table, rates, "accelerate", type(model).__name__)
    if rates is not None and table.sites:
        write_rates(model, table, plan_rates(table, rates))
    if strategy is not None:
        for _, site in table.sites:
            if isinstance(site, DropBase) and not is_layer_drop_site(site):
                site.strategy = strategy
    rows: dict[str, SiteReport] = {}
    owners: dict[str, list[str]] = {}
    for name, site in table.sites:
        rate = site_rate(site)
        layer = is_layer_drop_site(site)
        if layer or isinstance(site, Residual):
            kind = "layer drop" if layer else "Residual"
            spec = site.spec if isinstance(site, Residual) else layer_drop_spec(site)
            runs = BATCH if spec.mode == "batch" else (ROW if spec.skips else MASK)
            auto = site.auto_choice if isinstance(site, Residual) else None
            rows[name] = SiteReport(
                name, type(site).__name__, rate, runs, f"droppath {kind}", auto or ""
            )
            continue
        owner, _, attr = name.rpartition(".")
        owners.setdefault(owner, []).append(attr)
        rows[name] = SiteReport(name, "", rate, MASK)
    for owner_name, attrs in owners.items():
        block = model.get_submodule(owner_name)
        if isinstance(block, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            adapter, reason = None, "a module of its own, not a slot of a block"
        else:
            adapter, reason = _plan(block, attrs, batchnorm)
        cls, before = _base(block), type(block)
        failed = block_state(block).failed
        if adapter is None:
            unswap_class(block, _AcceleratedBlock)
        else:
            swap_class(block, _AcceleratedBlock, tuple(sorted(attrs)), namespace=_namespace)
        if type(block) is not before or failed:
            # a check made under another class holds no more, and a failed one is made again
            # (on inputs that could not tell, a probe's, say, it may pass)
            recheck(block)
        for attr in attrs:
            name = f"{owner_name}.{attr}" if owner_name else attr
            site = getattr(block, attr)
            why, auto = reason, ""
            if adapter is not None and attr not in adapter.sites:
                runs, why = MASK, _unreached(cls, attr, adapter)
            elif adapter is None:
                runs = MASK
            elif failed and type(block) is before:
                runs = MASK
                why = f"failed its check ({failed.splitlines()[0]}); checked again on its next call"
            elif site.mode == "batch":
                runs = BATCH
            elif site.spec.skips:
                runs, auto = ROW, site.auto_choice or ""
            else:
                runs, why = MASK, "strategy 'mask'"
            rows[name] = SiteReport(name, cls.__name__, rows[name].rate, runs, why, auto)
    return AccelerationReport(rows.values())
