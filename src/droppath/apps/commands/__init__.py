"""The ``droppath`` command line: one module per command, each with ``register(sub)`` (its parser,
whose handler it sets as ``handler``) and ``run(ns)``, in the way of Hugging Face accelerate's
``commands/<name>.py``.

The command line sits on top of the library and of the applications' work (``droppath.apps.train``,
``droppath.apps.bench``): it turns options into their configs and their errors (``ValueError``,
``TypeError``, ``droppath.apps.data.DataError``) into one-line messages. Neither imports it.

The configs and the work name their settings as Python does (``batch must be an int >= 1``,
``data='cifar10' needs data_dir``); the messages the command prints name the flags the user
typed instead (``--batch must be ...``, ``--data cifar10 needs --data-dir``): see ``as_flags``.
A command's module imports torch only when the command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["COMMANDS", "UsageError", "as_flags", "config_from_args", "option_flags"]

# Each command and its one-line help: ``droppath --help`` lists them without importing them.
COMMANDS = {
    "bench": "time a training step of a model with each drop path variant",
    "train": "train a reference model; --compare: with and without stochastic depth",
}

_C = TypeVar("_C")


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option of ``parser`` by its destination, with the flag that sets it (the first
    listed: ``-p``, ``--data-dir``)."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}


def as_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the settings it names written as the flags that set them.

    A setting is named where the configs' messages name one: at the start (``batch must be``,
    ``resume and overwrite exclude ...``), as ``name=value`` (``--flag value``, or ``--flag``
    alone for True), or anywhere for a name with an underscore (``data_dir``), which no word
    of prose has. Flags already written (``--json``) stay as they are.

    Examples:
        >>> flags = {"data": "--data", "data_dir": "--data-dir", "p": "-p", "resume": "--resume"}
        >>> as_flags("data='cifar10' needs data_dir, the folder that holds it", flags)
        '--data cifar10 needs --data-dir, the folder that holds it'
        >>> as_flags("p must be a probability in [0, 1], got 1.5", flags)
        '-p must be a probability in [0, 1], got 1.5'
        >>> as_flags("run without resume=True to start fresh", flags)
        'run without --resume to start fresh'
    """
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    name = rf"(?<![\w./-])({names})"

    def valued(m: re.Match[str]) -> str:
        value = m.group(2)
        if value[:1] in "'\"" and " " not in value:
            value = value[1:-1]
        return flags[m.group(1)] if value == "True" else f"{flags[m.group(1)]} {value}"

    message = re.sub(rf"{name}=('[^']*'|\"[^\"]*\"|[^\s,;)]+)", valued, message)
    opening = re.match(rf"{name}(?:(?:, | and ){name})*(?=[\s'])", message)
    if opening:
        head = re.sub(name, lambda m: flags[m.group(1)], opening.group(0))
        message = head + message[opening.end() :]
    underscored = [re.escape(n) for n in flags if "_" in n]
    if underscored:
        pattern = rf"(?<![\w./-])({'|'.join(underscored)})(?![\w/-])"
        message = re.sub(pattern, lambda m: flags[m.group(1)], message)
    return message


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
