"""``draw_ahead``: every site's keep decisions drawn before the model's forward, so that a model
compiled with ``torch.compile`` runs its training step as one graph.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from droppath._engine import Drawn, DropBase, DropSpec, eager, masks, predraw
from droppath.acceleration import (
    accelerated_blocks,
    block_sites,
    checking_now,
    set_ahead,
    unchecked,
)
from droppath.layerdrop import layer_drop_holders
from droppath.residual import Residual

__all__ = ["AheadHandle", "draw_ahead"]


def draw_ahead(model: nn.Module, *, generator: torch.Generator | None = None) -> AheadHandle:
    """Draw the keep decisions of ``model``'s row-mode sites before each forward: its
    ``Residual`` blocks, the blocks that ``accelerate`` rewrote, and its layer-drop sites
    (``LayerDrop``, the layers that ``layer_drop`` converted).

    Without it, under ``torch.compile``, each site that skips rows draws its decisions on the
    host when it runs: one graph break per site and forward. With it, a forward pre-hook on
    ``model`` draws them all first, on the host, and each site's step (gather the rows to run,
    the branch, add them back, weighted) is part of the model's graph: one graph for the whole
    forward, whatever the draws, and no recompilation when a schedule changes the rates (the
    rates are in the drawn tensors, not in the graph). Nothing waits for the device. On the
    first training forward, while an accelerated block has not yet checked its derived forward,
    the hook runs the forward once eagerly, without gradients, for the checks (buffers and the
    random state put back), so that no check happens inside a graph.

    The decisions are those of the host-side step: each sample kept with probability exactly
    ``1 - p``, independently, from the CPU random state (or ``generator``, a CPU generator). A
    site draws for the batch size of the model's first tensor argument along its ``batch_dim``,
    or, once it has run a host-side step, for the batch size that step saw (a block that runs on
    windows, or on tokens as rows); a call whose decisions do not fit takes the host-side step.
    Sites in batch mode, and ``Residual`` blocks pinned to ``strategy="mask"`` (whose mask is
    drawn inside the graph already), are left as they are; an accelerated site pinned to the
    mask runs every row, weighted by its decision. A site with ``strategy="auto"`` takes the
    row subset: in one graph, the mask's alternative would run every row through the same
    gathers. A layer-drop site handed a key/value cache takes its host-side step (it runs for
    every sample). The sites are those in ``model`` now. Where the step keeps no row, two rows run
    with weight 0: the branch's parameters get zero gradients, as DDP wants.

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
    blocks = accelerated_blocks(model)
    sites: list[tuple[nn.Module, _Holder]] = [
        (m, m) for m in model.modules() if isinstance(m, Residual)
    ]
    sites += [(s, s) for b in blocks for s in block_sites(b) if isinstance(s, DropBase)]
    sites += layer_drop_holders(model)
    for block in blocks:
        set_ahead(block, True)
    hook = _DrawHook(sites, blocks, generator)
    return AheadHandle(model.register_forward_pre_hook(hook, with_kwargs=True), hook)


class _Holder(Protocol):
    """What holds a site's settings and the decisions drawn for it: the site (a ``DropBase``),
    or a converted layer's layer-drop settings."""

    @property
    def spec(self) -> DropSpec: ...

    _ahead: Drawn | None
    _ahead_rows: tuple[int, torch.device] | None


class _DrawHook:
    """The forward pre-hook: a picklable object, so a model that holds it pickles."""

    def __init__(
        self,
        sites: list[tuple[nn.Module, _Holder]],
        blocks: list[nn.Module],
        generator: torch.Generator | None,
    ) -> None:
        self.sites, self.blocks, self.generator = sites, blocks, generator

    def __call__(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        _draw(module, self, args, kwargs)


class AheadHandle:
    """What ``draw_ahead`` returns: ``remove()`` takes its hook away and the drawn decisions
    with it (the blocks draw for themselves again). Also a context manager that removes it on
    exit."""

    def __init__(self, handle: RemovableHandle, hook: _DrawHook) -> None:
        self._handle, self._hook = handle, hook

    def remove(self) -> None:
        self._handle.remove()
        for _, holder in self._hook.sites:
            holder._ahead = None
        for block in self._hook.blocks:
            set_ahead(block, False)

    def __enter__(self) -> AheadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@eager  # on the host: under torch.compile, the one graph break of the forward, before its graph
def _draw(model: nn.Module, hook: _DrawHook, args: Any, kwargs: dict[str, Any]) -> None:
    if model.training and any(unchecked(b) for b in hook.blocks):
        _check_blocks(model, args, kwargs)
    first = _first_tensor((*args, *kwargs.values()))
    for site, holder in hook.sites:
        holder._ahead = _decisions(site, holder, first, hook.generator)


def _check_blocks(model: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
    """Run the forward once, eagerly and without gradients, so that every accelerated block
    checks its derived forward on its real inputs before a compiled graph runs it (a check in
    the graph would break it). Buffers (BatchNorm's statistics) and the random state are put
    back as they were."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices), checking_now(model):
        model.forward(*args, **kwargs)
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


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
    site: nn.Module, holder: _Holder, first: torch.Tensor | None, generator: torch.Generator | None
) -> Drawn | None:
    """A site's decisions for the coming forward, or None where it takes another step: drawn
    for the batch size and device of its last host-side step, or before its first for those of
    the model's first tensor argument along the site's ``batch_dim``. A ``Residual`` pinned to
    the mask draws its mask in the graph; another site pinned to it (an accelerated block's)
    gets the mask as decisions: every row run, each weighted."""
    spec = holder.spec
    if not site.training or spec.mode != "row":
        return None
    masked = masks(spec.mode, spec.strategy)
    if masked and isinstance(site, Residual):
        return None
    seen = holder._ahead_rows
    if seen is None:
        if first is None or first.dim() == 0:
            return None
        seen = (first.shape[spec.batch_dim % first.dim()], first.device)
    n, device = seen
    return predraw(spec, n, device, generator, every_row=masked)
