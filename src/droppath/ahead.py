"""``draw_ahead``: every site's keep decisions drawn before the model's forward, so that a model
compiled with ``torch.compile`` runs its training step as one graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from droppath._engine import Drawn, eager, masks, predraw
from droppath.residual import Residual

__all__ = ["AheadHandle", "draw_ahead"]


def draw_ahead(model: nn.Module, *, generator: torch.Generator | None = None) -> AheadHandle:
    """Draw the keep decisions of ``model``'s row-mode ``Residual`` blocks before each forward.

    Without it, under ``torch.compile``, each ``Residual`` that skips rows draws its decisions on
    the host when it runs: one graph break per block and forward. With it, a forward pre-hook on
    ``model`` draws them all first, on the host, and each block's step (gather the rows to run,
    the branch, add them back, weighted) is part of the model's graph: one graph for the whole
    forward, whatever the draws, and no recompilation when a schedule changes the rates (the
    rates are in the drawn tensors, not in the graph). Nothing waits for the device.

    The decisions are those of the host-side step: each sample kept with probability exactly
    ``1 - p``, independently, from the CPU random state (or ``generator``, a CPU generator). A
    block draws ahead from its second training call on: the first runs the host-side step and
    notes the batch size; a call with another batch size (the last, smaller batch of an epoch)
    takes the host-side step again. Blocks in batch mode, or pinned to ``strategy="mask"``
    (whose mask is drawn inside the graph already), are left as they are. A block with
    ``strategy="auto"`` takes the row subset: in one graph, the mask's alternative would run
    every row through the same gather and scatter. The blocks are those in ``model`` now.

    Args:
        model: the module whose forward the decisions are drawn before; compile it (or not)
            after this call.
        generator: a CPU generator for the draws. Default: None (the global one).

    Returns:
        A handle whose ``remove()`` takes the hook away: the blocks draw for themselves again.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from droppath import Residual, draw_ahead
        >>> model = nn.Sequential(*[Residual(nn.Linear(8, 8), p=0.3) for _ in range(4)])
        >>> handle = draw_ahead(model)
        >>> compiled = torch.compile(model, backend="eager")
        >>> x = torch.randn(16, 8)
        >>> for _ in range(3):
        ...     compiled(x).sum().backward()
        >>> handle.remove()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
    ):
        raise ValueError(f"generator must be a CPU torch.Generator or None, got {generator!r}")
    hook = _DrawHook([m for m in model.modules() if isinstance(m, Residual)], generator)
    return AheadHandle(model.register_forward_pre_hook(hook), hook.blocks)


class _DrawHook:
    """The forward pre-hook: a picklable object, so a model that holds it pickles."""

    def __init__(self, blocks: list[Residual], generator: torch.Generator | None) -> None:
        self.blocks, self.generator = blocks, generator

    def __call__(self, module: nn.Module, args: Any) -> None:
        _draw(self.blocks, _first_tensor(args), self.generator)


class AheadHandle:
    """What ``draw_ahead`` returns: ``remove()`` takes its hook away and the drawn decisions
    with it (the blocks draw for themselves again). Also a context manager that removes it on
    exit."""

    def __init__(self, handle: RemovableHandle, blocks: list[Residual]) -> None:
        self._handle, self._blocks = handle, blocks

    def remove(self) -> None:
        self._handle.remove()
        for block in self._blocks:
            block._ahead = None

    def __enter__(self) -> AheadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@eager  # on the host: under torch.compile, the one graph break of the forward, before its graph
def _draw(
    blocks: list[Residual], first: torch.Tensor | None, generator: torch.Generator | None
) -> None:
    for block in blocks:
        block._ahead = _decisions(block, first, generator)


def _first_tensor(args: Any) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, tuple | list):
            found = _first_tensor(a)
            if found is not None:
                return found
    return None


def _decisions(
    block: Residual, first: torch.Tensor | None, generator: torch.Generator | None
) -> Drawn | None:
    """A block's decisions for the coming forward, or None where it takes another step: drawn
    for the batch size and device of its last host-side step, or before its first for those of
    the model's first tensor argument along the block's ``batch_dim``."""
    if not block.training or block.mode != "row" or masks(block.mode, block.strategy):
        return None
    seen = block._ahead_rows
    if seen is None:
        if first is None or first.dim() == 0:
            return None
        seen = (first.shape[block.batch_dim % first.dim()], first.device)
    n, device = seen
    return predraw(block.spec, n, device, generator)
