"""droppath's warnings: one category, ``DropPathWarning``, pointed at the user's call.

A warning raised deep in droppath (inside a step that ``torch.compiler.disable`` wraps, under a
module's ``__call__``) would otherwise be attributed to a line of droppath or of torch, where
``warnings.filterwarnings(..., module=...)`` and the "shown once per line" rule do not help the
user. ``warn`` attributes it to the first frame outside droppath and torch instead: the user's
line that called the model or the function. No torch import here: ``import droppath`` stays light.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

__all__ = ["DropPathWarning", "warn"]

# The frames skipped: droppath's files, torch's, and the code droppath generates (accelerate's
# derived forwards, compiled under file names such as "<droppath derived ...>"). By file, not by
# module name: a doctest runs in a copy of the module's namespace.
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


def _folder(file: str) -> str:
    return os.path.dirname(os.path.abspath(file)) + os.sep


_OWN = _folder(__file__)  # this file sits in droppath/


def _internal(frame: FrameType, folders: tuple[str, ...]) -> bool:
    name = frame.f_code.co_filename
    return name.startswith(_GENERATED) or os.path.abspath(name).startswith(folders)


def warn(message: str) -> None:
    """Warn with ``message`` as a ``DropPathWarning``, attributed to the first frame, from the
    caller outward, that lies outside droppath and torch (the outermost one if none does)."""
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    folders = (_OWN, _folder(torch_file)) if torch_file else (_OWN,)
    frame = sys._getframe(1)
    level = 2  # warnings.warn's count for the frame that called this function
    while _internal(frame, folders) and frame.f_back is not None:
        frame = frame.f_back
        level += 1
    warnings.warn(message, DropPathWarning, stacklevel=level)
