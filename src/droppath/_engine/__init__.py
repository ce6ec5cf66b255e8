"""droppath's engine: the one training step that every drop-path site takes.

- ``spec``: ``DropSpec``, a site's settings as one frozen object checked when built, and
  ``DropBase``, the module base that holds one (``DropPath``, ``Residual``, ``LayerDrop``).
- ``draws``: the random decisions, drawn on the host (``draw``, ``draw_gate``,
  ``draw_rows``).
- ``ops``: the tensor operations (``split``, ``scatter_add``, ``skip``,
  ``rows``, ``gather``, ``keep_mask``) and how they run under torch.compile
  (``host_side``, ``eager``).
- ``ahead``: decisions drawn before the model's forward (``predraw``) and the traceable step
  that reads them (``ahead_add``), for one graph per compiled forward (``droppath.draw_ahead``).
- ``cost``: ``AutoChoice``, how ``strategy="auto"`` chooses a site's step from measured costs.
- ``step``: the step itself, ``skip_add`` (the dropped work skipped) or ``mask_add``
  (the classic mask), and ``run``, which calls a branch from the host-side step.

The entry points (``droppath.residual``, ``droppath.layerdrop``, ``droppath.drop``,
``droppath._derive.ops``) check their inputs, build or read a ``DropSpec`` (checked when
built), and call the step, which checks nothing again.
"""

from droppath._engine.ahead import (
    Drawn,
    ahead_add,
    ahead_lerp,
    ahead_put,
    ahead_rows,
    fitting,
    predraw,
)
from droppath._engine.cost import AutoChoice
from droppath._engine.draws import draw, draw_gate, draw_rows
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
from droppath._engine.step import Combine, Subset, Sum, mask_add, run, skip_add

__all__ = [
    "ALL_SETTINGS",
    "AutoChoice",
    "Branch",
    "Combine",
    "Drawn",
    "DropBase",
    "DropSpec",
    "Subset",
    "Sum",
    "ahead_add",
    "ahead_lerp",
    "ahead_put",
    "ahead_rows",
    "draw",
    "draw_gate",
    "draw_rows",
    "eager",
    "fitting",
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
