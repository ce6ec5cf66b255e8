"""droppath's engine: the one training step that every drop-path site takes.

- ``spec``: ``DropSpec``, a site's settings as one frozen object checked when built, and
  ``DropBase``, the module base that holds one (``DropPath``, ``Residual``, ``LayerDrop``).
- ``draws``: the random decisions, drawn on the host (``draw``, ``draw_gate``,
  ``draw_rows``).
- ``ops``: the tensor operations (``split``, ``scatter_add``, ``skip``,
  ``rows``, ``gather``, ``keep_mask``) and how they run under torch.compile
  (``host_side``, ``eager``).
- ``ahead``: decisions drawn before the model's forward (``predraw``) and the traceable gathers
  that read them, for one graph per compiled forward (``droppath.draw_ahead``).
- ``combine``: how a kept output is put back (``Sum``, ``Lerp``, ``Fill``), in every form of
  the step: drawn now, forced (the check of an accelerated block), drawn ahead.
- ``cost``: ``AutoChoice``, how ``strategy="auto"`` chooses a site's step from measured costs.
- ``step``: the step itself, ``skip_add`` (the dropped work skipped, decisions drawn now or
  forced), ``mask_add`` (the classic mask) or ``ahead_add`` (decisions drawn ahead), and
  ``run``, which calls a shortcut or a module from the host-side step.

The entry points (``droppath.residual``, ``droppath.layerdrop``, ``droppath.drop``,
``droppath._derive.ops``) check their inputs, build or read a ``DropSpec`` (checked when
built), and call the step, which checks nothing again.
"""

from droppath._engine.ahead import Drawn, ahead_rows, fitting, predraw
from droppath._engine.combine import (
    FILL_AHEAD,
    LERP,
    SUM,
    SUM_BRANCH_FIRST,
    Combine,
    Fill,
    Lerp,
    Subset,
    Sum,
    check_shape,
)
from droppath._engine.cost import AutoChoice
from droppath._engine.draws import draw, draw_gate, draw_rows, forced
from droppath._engine.ops import (
    Branch,
    eager,
    gather,
    host_side,
    keep_mask,
    rows,
    scatter_add,
    skip,
    split,
    zeros_for,
)
from droppath._engine.spec import ALL_SETTINGS, DropBase, DropSpec, masks
from droppath._engine.step import ahead_add, mask_add, run, skip_add

__all__ = [
    "ALL_SETTINGS",
    "FILL_AHEAD",
    "LERP",
    "SUM",
    "SUM_BRANCH_FIRST",
    "AutoChoice",
    "Branch",
    "Combine",
    "Drawn",
    "DropBase",
    "DropSpec",
    "Fill",
    "Lerp",
    "Subset",
    "Sum",
    "ahead_add",
    "ahead_rows",
    "check_shape",
    "draw",
    "draw_gate",
    "draw_rows",
    "eager",
    "fitting",
    "forced",
    "gather",
    "host_side",
    "keep_mask",
    "mask_add",
    "masks",
    "predraw",
    "rows",
    "run",
    "scatter_add",
    "skip",
    "skip_add",
    "split",
    "zeros_for",
]
