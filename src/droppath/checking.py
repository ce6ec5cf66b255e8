"""``check``: verify an accelerated model's derived forwards up front, on example inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from droppath._checks import check_model
from droppath._engine import DropBase
from droppath._engine.ranks import get_rng_state, set_rng_state
from droppath.acceleration import accelerated_blocks, check_states, checking_now, recheck
from droppath.sites import drop_path_sites

__all__ = ["check"]


def check(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, str]:
    """Check every block that ``accelerate`` rewrote on example inputs, before training.

    Otherwise each block checks its derived forward on its first training call, inside the first
    step (per rank, after DDP or FSDP has wrapped the model; never, at a batch of one per rank).
    ``check`` runs one training forward of ``model`` on ``model(*args, **kwargs)`` with every
    block checked, at rate 0 (it draws no decision), and leaves nothing behind: buffers
    (BatchNorm statistics), the random state, the training flag and the gradients are as they
    were. A block that failed before is checked again. Call it before wrapping the model (DDP,
    FSDP: a block whose branch FSDP shards on its own cannot check itself inside a training
    step), with a batch of at least 2.

    Args:
        model: a model that ``droppath.accelerate`` has rewritten.
        *args: the example inputs, as the model's forward takes them.
        **kwargs: more example inputs, by keyword.

    Returns:
        Each accelerated block's state, by module name: ``"verified"`` (it will run its derived
        forward), ``"failed: <reason>"`` (it will stay on the mask), or ``"pending"`` (these
        inputs cannot tell: fewer than 2 samples, fake or meta tensors).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from droppath import accelerate, check
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin, self.drop_path = nn.Linear(4, 4), nn.Identity()
        ...     def forward(self, x):
        ...         return x + self.drop_path(self.lin(x).relu())
        >>> model = nn.Sequential(Block(), Block())
        >>> _ = accelerate(model, p=0.2)
        >>> check(model, torch.randn(8, 4))
        {'0': 'verified', '1': 'verified'}
    """
    check_model(model, "check")
    blocks = accelerated_blocks(model)
    for block in blocks:
        recheck(block)
    # at rate 0 (checked all the same): the forward draws nothing, so the random state and any
    # recorder of the decisions see nothing of it
    rates = [(site, site.p) for _, site in drop_path_sites(model) if isinstance(site, DropBase)]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu, ranks = torch.get_rng_state(), get_rng_state()
    devices = torch.cuda.get_rng_state_all() if torch.cuda.device_count() else None
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        for site, _ in rates:
            site.p = 0.0
        with torch.enable_grad(), checking_now(model):
            model(*args, **kwargs)
    finally:
        for site, p in rates:
            site.p = p
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        torch.set_rng_state(cpu)
        set_rng_state(ranks)
        if devices is not None:
            torch.cuda.set_rng_state_all(devices)
    return check_states(model)
