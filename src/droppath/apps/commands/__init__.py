"""The ``droppath`` command line: one module per command, each with ``register(sub)`` (its parser,
whose handler it sets as ``handler``) and ``run(ns)``, in the way of Hugging Face accelerate's
``commands/<name>.py``.

The command line sits on top of the library and of the applications' work (``droppath.apps.train``,
``droppath.apps.bench``): it turns options into their configs and their errors (``ValueError``,
``TypeError``, ``droppath.apps.data.DataError``) into one-line messages. Neither imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

__all__ = ["COMMANDS", "UsageError", "config_from_args"]

# Each command and its one-line help: ``droppath --help`` lists them without importing them.
COMMANDS = {
    "bench": "time a training step of a model with each drop path variant",
    "train": "train a reference model; --compare: with and without stochastic depth",
}

_C = TypeVar("_C")


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def config_from_args(cls: type[_C], ns: argparse.Namespace, **overrides: Any) -> _C:
    """Build the dataclass ``cls`` from the parsed options that share its field names.

    Fields without an option keep their defaults; ``overrides`` set the others. Checks in the
    dataclass raise ValueError or TypeError, reported as a UsageError.
    """
    values = {
        f.name: getattr(ns, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in overrides and hasattr(ns, f.name)
    }
    try:
        return cls(**values, **overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
