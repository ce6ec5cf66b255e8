"""The settings of a drop-path site as one frozen object, and the module base that holds them."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from droppath._checks import (
    MODES,
    STRATEGIES,
    check_bool,
    check_bucket,
    check_choice,
    check_int,
    check_probability,
)
from droppath._engine.cost import AutoChoice

# The settings every drop-path module shows as attributes (``DropPath``, ``LayerDrop``), and all
# of them (``Residual``).
COMMON_SETTINGS = ("p", "mode", "batch_dim", "scale_by_keep")
ALL_SETTINGS = (*COMMON_SETTINGS, "strategy", "bucket")


def masks(mode: str, strategy: str, auto: AutoChoice | None = None) -> bool:
    """Whether a training step masks the branch output instead of skipping the dropped work:
    row mode's ``"mask"`` strategy, or its ``"auto"`` strategy when ``auto``, the site's measured
    costs, chose the mask. The one place where that choice is made."""
    if mode != "row":
        return False
    return strategy == "mask" or (strategy == "auto" and auto is not None and not auto.subset)


@dataclass(frozen=True)
class DropSpec:
    """The settings of one drop-path site, checked once, when built.

    The fields mean what the arguments of ``droppath.drop_add_residual`` of the same names
    mean; a bad value raises the error that the public entry points raise for it (``p must be a
    probability in [0, 1], got 1.5``). ``p`` is stored as a float and ``batch_dim`` as an int (it
    may be negative: it is made non-negative for each input). Build a changed copy with
    ``dataclasses.replace``, which checks again.

    Examples:
        >>> from droppath._engine import DropSpec
        >>> spec = DropSpec(0.25, mode="batch")
        >>> spec.scale, spec.skips
        (1.3333333333333333, True)
        >>> DropSpec(1.5)
        Traceback (most recent call last):
        ...
        ValueError: p must be a probability in [0, 1], got 1.5
    """

    p: float = 0.0
    mode: str = "row"
    batch_dim: int = 0
    scale_by_keep: bool = True
    strategy: str = "auto"
    bucket: int | None = None
    # a site module's measured costs, for strategy "auto" (None: the row subset); not a setting
    auto: AutoChoice | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_checked = object.__setattr__  # frozen: the checked values replace the given ones
        set_checked(self, "p", check_probability(self.p))
        check_choice(self.mode, "mode", MODES)
        set_checked(self, "batch_dim", check_int(self.batch_dim, "batch_dim"))
        check_bool(self.scale_by_keep, "scale_by_keep")
        check_choice(self.strategy, "strategy", STRATEGIES)
        set_checked(self, "bucket", check_bucket(self.bucket))

    @property
    def scale(self) -> float:
        """The factor of a kept branch output: ``1 / (1 - p)`` with ``scale_by_keep``, else 1
        (1 as well when ``p`` is 1, where nothing is kept)."""
        keep = 1.0 - self.p
        return 1.0 / keep if self.scale_by_keep and keep > 0.0 else 1.0

    @property
    def skips(self) -> bool:
        """Whether a training step skips the dropped work (see ``masks``)."""
        return not masks(self.mode, self.strategy)


class DropBase(nn.Module):
    """The base of droppath's drop-path modules: their settings, checked when assigned.

    The settings are plain attributes, so a schedule can change them on a live module between
    steps, and torch.compile reads a rate as it reads any float attribute. ``spec`` holds them
    all as one ``DropSpec``, rebuilt, and so checked, at each assignment: ``module.p = 2.0``
    raises there, not at the next forward. The host-side training steps read ``spec``. Pickles
    hold the attributes alone (``spec`` is rebuilt from them when loaded).

    Args:
        spec: the settings.
        names: the settings shown as attributes. Default: ``COMMON_SETTINGS``.
    """

    p: float
    mode: str
    batch_dim: int
    scale_by_keep: bool
    _spec: DropSpec
    # whether strategy "auto" measures this module's costs (False: the row subset, always)
    _measures: bool = True
    # set by droppath.draw_ahead's hook: this forward's decisions (droppath._engine.ahead); the
    # batch size and device of the last host-side step, which the hook draws for
    _ahead: Any = None  # a droppath._engine.ahead.Drawn, or None
    _ahead_rows: tuple[int, torch.device] | None = None

    def __init__(self, spec: DropSpec, names: tuple[str, ...] = COMMON_SETTINGS) -> None:
        super().__init__()
        own = copy.copy(spec)  # checked already: not built again
        object.__setattr__(own, "auto", self._new_auto())  # this module's own measurements
        self.__dict__["_spec"] = own
        self.__dict__.update({name: getattr(spec, name) for name in names})

    @property
    def spec(self) -> DropSpec:
        """The settings as one ``DropSpec`` (assign the settings themselves to change it)."""
        return self._spec

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ALL_SETTINGS:
            spec = replace(self._spec, **{name: value})  # checks the new value
            self.__dict__["_spec"] = spec
            value = getattr(spec, name)
            if name == "p" and spec.auto is not None:
                spec.auto.update(spec.p)  # a new rate may change what "auto" chooses
        super().__setattr__(name, value)

    @property
    def auto_choice(self) -> str | None:
        """What row mode's ``strategy="auto"`` takes at this site in training: ``"pending"``
        until its costs are measured (on its first training calls, see ``droppath.Residual``),
        then ``"subset"`` or ``"mask"``; None when the site has no choice to make (another
        strategy, batch mode, or a module that always takes the subset: ``LayerDrop``). A site
        whose decisions ``droppath.draw_ahead`` draws takes the subset, in the model's graph."""
        spec = self._spec
        if spec.mode != "row" or spec.strategy != "auto" or spec.auto is None:
            return None
        return "subset" if self._ahead is not None else spec.auto.state

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]
        state.pop("_spec", None)  # with the measured costs: measured again where loaded
        state.pop("_ahead", None)  # one forward's decisions (droppath.draw_ahead)
        state.pop("_ahead_rows", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        settings = {name: state[name] for name in ALL_SETTINGS if name in state}
        self.__dict__["_spec"] = DropSpec(**settings, auto=self._new_auto())

    def _new_auto(self) -> AutoChoice | None:
        return AutoChoice() if self._measures else None

    def extra_repr(self) -> str:
        return (
            f"p={self.p}, mode={self.mode!r}, batch_dim={self.batch_dim}, "
            f"scale_by_keep={self.scale_by_keep}{self._chosen()}"
        )

    def _chosen(self) -> str:
        """``", auto='mask'"`` once "auto" has chosen, else nothing."""
        choice = self.auto_choice
        return "" if choice in (None, "pending") else f", auto={choice!r}"
