"""Stochastic depth (drop path) for PyTorch that keeps both the regularization and the saving."""

from droppath._version import __version__
from droppath.drop import DropPath, drop_path
from droppath.layerdrop import LayerDrop, SkippedLayer, layer_drop
from droppath.residual import Residual, drop_add_residual
from droppath.schedules import (
    DropRateScheduler,
    convert,
    depth_rates,
    drop_path_sites,
    prune,
    set_drop_rates,
)

__all__ = [
    "DropPath",
    "DropRateScheduler",
    "LayerDrop",
    "Residual",
    "SkippedLayer",
    "__version__",
    "convert",
    "depth_rates",
    "drop_add_residual",
    "drop_path",
    "drop_path_sites",
    "layer_drop",
    "prune",
    "set_drop_rates",
]
