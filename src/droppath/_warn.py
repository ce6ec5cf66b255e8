"""droppath's warnings: one category, ``DropPathWarning``, pointed at the user's call.

A warning raised deep in droppath (inside a step that ``torch.compiler.disable`` wraps, under a
module's ``__call__``) would otherwise be attributed to a line of droppath or of torch, where
``warnings.filterwarnings(..., module=...)`` and the "shown once per line" rule do not help the
user. ``warn`` attributes it to the first frame outside droppath and torch instead: the user's
line that called the model or the function. No torch import here: ``import droppath`` stays light.
"""

from __future__ import annotations

import sys
import warnings
from types import FrameType

__all__ = ["DropPathWarning", "warn"]

# Frames of these packages are skipped, and of code that droppath generates (``accelerate``'s
# derived forwards, compiled under file names such as "<droppath derived ...>").
_INTERNAL = ("droppath", "torch")
_GENERATED = "<droppath"


class DropPathWarning(UserWarning):
    """The category of every warning droppath gives: a site that stays on the mask, a layer
    handed a key/value cache, a call that found nothing to act on.

    Each is attributed to the first frame outside droppath and torch, the line of your code
    that called droppath or the model, so filters by category and by your module both work.

    Examples:
        >>> import warnings
        >>> from torch import nn
        >>> from droppath import DropPathWarning, accelerate
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     report = accelerate(nn.Linear(2, 2))  # no drop-path site: a warning
        >>> caught[0].category is DropPathWarning, caught[0].filename.startswith("<doctest")
        (True, True)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DropPathWarning)  # droppath's warnings only
        ...     report = accelerate(nn.Linear(2, 2))
    """


def _internal(frame: FrameType) -> bool:
    if frame.f_code.co_filename.startswith(_GENERATED):
        return True
    package = str(frame.f_globals.get("__name__", "")).partition(".")[0]
    return package in _INTERNAL


def warn(message: str) -> None:
    """Warn with ``message`` as a ``DropPathWarning``, attributed to the caller's caller that
    lies outside droppath and torch (the outermost frame if all of them lie inside)."""
    frame = sys._getframe(1)
    level = 2  # warnings.warn's count for the frame that called this function
    while _internal(frame) and frame.f_back is not None:
        frame = frame.f_back
        level += 1
    warnings.warn(message, DropPathWarning, stacklevel=level)
