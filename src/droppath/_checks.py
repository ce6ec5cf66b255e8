"""Argument checks shared by every public entry point.

Each check raises with one message shape: the argument's name, what is allowed, and what was
received (``p must be a probability in [0, 1], got 1.5``).

No torch import at the top: the command line's options are checked with these (``droppath
train --help`` answers without loading torch); the two checks of tensors and models import it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

MODES = ("row", "batch")
STRATEGIES = ("auto", "subset", "mask")


def _choices(values: Sequence[str]) -> str:
    return ", ".join(repr(v) for v in values)


def check_probability(p: Any, name: str = "p") -> float:
    """Return ``p`` as a float after checking that it lies in [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(
            f"{name} must be a probability in [0, 1], got {p!r} of type {type(p).__name__}"
        )
    value = float(p)
    if not 0.0 <= value <= 1.0:  # also catches NaN; math.isnan would break torch.compile graphs
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return value


def check_choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {_choices(allowed)}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    return int(value)


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    number = check_int(value, name)
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


def check_bucket(bucket: Any) -> int | None:
    """``None``, or the positive int that row-subset batch sizes are rounded up to a multiple of."""
    if bucket is None:
        return None
    if isinstance(bucket, bool) or not isinstance(bucket, numbers.Integral) or bucket < 1:
        raise ValueError(f"bucket must be None or an int >= 1, got {bucket!r}")
    return int(bucket)


def check_input(x: Any, batch_dim: int, name: str = "x") -> int:
    """Check a tensor argument and return ``batch_dim`` made non-negative."""
    import torch  # loaded already wherever a tensor exists: a dictionary look-up

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-D tensor")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    return check_batch_dim(batch_dim, x.dim())


def check_batch_dim(batch_dim: Any, ndim: int) -> int:
    dim = check_int(batch_dim, "batch_dim")
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"batch_dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-D input, got {dim}"
        )
    return dim % ndim


def check_drop_args(p: Any, mode: Any, scale_by_keep: Any) -> float:
    """The checks common to ``drop_path`` and ``drop_add_residual``; returns ``p`` as a float."""
    check_choice(mode, "mode", MODES)
    check_bool(scale_by_keep, "scale_by_keep")
    return check_probability(p)


def check_model(model: Any, action: str) -> nn.Module:
    """Check that ``model`` is a Python module whose drop-path code ``action`` can reach.

    A ``torch.fx.GraphModule`` (``symbolic_trace``, torchvision's and timm's
    ``create_feature_extractor``) is refused, wherever it sits in the model: tracing has turned the
    libraries' drop paths into graph nodes with their rates as constants, and its module tree no
    longer has the blocks that rates are counted by.
    """
    import torch
    from torch import fx, nn

    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("model must be a Python nn.Module, got a TorchScript module")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    traced = next((n for n, m in model.named_modules() if isinstance(m, fx.GraphModule)), None)
    if traced is not None:
        where = f"a torch.fx.GraphModule at {traced!r}" if traced else "a torch.fx.GraphModule"
        raise TypeError(
            f"model must be an untraced nn.Module, got {where}: tracing fixes the drop paths of "
            f"timm, torchvision and Hugging Face into the graph, where {action} cannot reach "
            f"them. Call {action} on the model before tracing it (symbolic_trace, "
            "create_feature_extractor); droppath's own DropPath and Residual stay modules in the "
            "trace, shared with that model, so rates set on it later still apply."
        )
    return model
