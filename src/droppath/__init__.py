"""Stochastic depth (drop path) for PyTorch that keeps both the regularization and the saving."""

from droppath._version import __version__
from droppath.drop import DropPath, drop_path
from droppath.residual import Residual, drop_add_residual

__all__ = [
    "DropPath",
    "Residual",
    "__version__",
    "drop_add_residual",
    "drop_path",
]
