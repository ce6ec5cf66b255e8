"""Stochastic depth (drop path) for PyTorch that keeps both the regularization and the saving.

The public names load on first use (PEP 562), so that ``import droppath`` and ``droppath --help``
do not import torch; ``from droppath import Residual`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from droppath._version import __version__

# Each public name and the module that defines it.
_EXPORTS = {
    "AccelerationReport": "droppath.report",
    "SiteReport": "droppath.report",
    "accelerate": "droppath.acceleration",
    "check": "droppath.checking",
    "draw_ahead": "droppath.ahead",
    "DropPath": "droppath.drop",
    "DropPathWarning": "droppath._warn",
    "drop_path": "droppath.drop",
    "LayerDrop": "droppath.layerdrop",
    "SkippedLayer": "droppath.layerdrop",
    "layer_drop": "droppath.layerdrop",
    "Residual": "droppath.residual",
    "drop_add_residual": "droppath.residual",
    "depth_rates": "droppath.rates",
    "DropRateScheduler": "droppath.scheduler",
    "convert": "droppath.sites",
    "drop_path_sites": "droppath.sites",
    "set_drop_rates": "droppath.site_rates",
    "prune": "droppath.pruning",
    "get_rng_state": "droppath._engine.ranks",
    "set_rng_state": "droppath._engine.ranks",
}

__all__ = [
    "AccelerationReport",
    "DropPath",
    "DropPathWarning",
    "DropRateScheduler",
    "LayerDrop",
    "Residual",
    "SiteReport",
    "SkippedLayer",
    "__version__",
    "accelerate",
    "check",
    "convert",
    "depth_rates",
    "draw_ahead",
    "drop_add_residual",
    "drop_path",
    "drop_path_sites",
    "get_rng_state",
    "layer_drop",
    "prune",
    "set_drop_rates",
    "set_rng_state",
]

if TYPE_CHECKING:
    from droppath._engine.ranks import get_rng_state, set_rng_state
    from droppath._warn import DropPathWarning
    from droppath.acceleration import accelerate
    from droppath.ahead import draw_ahead
    from droppath.checking import check
    from droppath.drop import DropPath, drop_path
    from droppath.layerdrop import LayerDrop, SkippedLayer, layer_drop
    from droppath.pruning import prune
    from droppath.rates import depth_rates
    from droppath.report import AccelerationReport, SiteReport
    from droppath.residual import Residual, drop_add_residual
    from droppath.scheduler import DropRateScheduler
    from droppath.site_rates import set_drop_rates
    from droppath.sites import convert, drop_path_sites


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'droppath' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
