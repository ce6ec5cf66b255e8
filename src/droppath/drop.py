"""The classic drop-path op: ``drop_path`` and its module ``DropPath``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from droppath._checks import check_drop_args, check_input
from droppath._engine import DropBase, DropSpec, keep_mask
from droppath._fx import function_node, is_proxy, module_node

__all__ = ["DropPath", "drop_path"]


def drop_path(
    x: Tensor,
    p: float = 0.0,
    training: bool = True,
    *,
    mode: str = "row",
    batch_dim: int = 0,
    scale_by_keep: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Randomly zero whole samples (or the whole tensor) of a residual branch's output.

    Stochastic depth from Huang et al., "Deep Networks with Stochastic Depth" (ECCV 2016), in the
    per-sample form used by most modern models: each sample of ``x`` is kept with probability
    ``1 - p`` and zeroed otherwise; kept samples are multiplied by ``1 / (1 - p)`` so that the
    expectation is unchanged. Apply it to the branch of a residual block, ``x + drop_path(f(x))``.
    The branch is still computed for every sample; ``droppath.drop_add_residual`` skips it.

    Args:
        x: the input, of any floating dtype and rank >= 1.
        p: the probability of *dropping*, in [0, 1]. Default: 0.0.
        training: apply the drop only when True; otherwise return ``x`` itself. Default: True.
        mode: ``"row"`` draws one keep/drop decision per sample along ``batch_dim``; ``"batch"``
            draws one decision for the whole tensor. Default: ``"row"``.
        batch_dim: the dimension that indexes samples; negative values count from the end.
            Default: 0.
        scale_by_keep: multiply kept values by ``1 / (1 - p)``. Default: True.
        generator: the random generator for the mask, on ``x``'s device. Default: the global one.

    Returns:
        A new tensor of ``x``'s shape, dtype and memory format; ``x`` itself when ``training`` is
        False or ``p`` is 0. ``x`` is never modified in place. ``p = 1`` gives zeros.

    Shape:
        - Input: :math:`(*)`, any shape with at least one dimension.
        - Output: :math:`(*)`, the same shape.

    Examples:
        >>> import torch
        >>> from droppath import drop_path
        >>> x = torch.ones(6, 3)
        >>> y = drop_path(x, p=0.5, generator=torch.Generator().manual_seed(0))
        >>> sorted(set(y[:, 0].tolist()))  # each row is either dropped or scaled by 1 / (1 - p)
        [0.0, 2.0]
        >>> bool((y == y[:, :1]).all())  # a row is dropped or kept whole
        True
        >>> drop_path(x, p=0.5, training=False) is x
        True
    """
    if is_proxy(x):
        if generator is not None:
            raise ValueError("generator must be None when tracing with torch.fx, got a Generator")
        node: Tensor = function_node(
            drop_path, x, p, training, mode=mode, batch_dim=batch_dim, scale_by_keep=scale_by_keep
        )
        return node
    dim = check_input(x, batch_dim)
    p = check_drop_args(p, mode, scale_by_keep)
    if not training or p == 0.0:
        return x
    mask = keep_mask(
        x, p, mode=mode, batch_dim=dim, scale_by_keep=scale_by_keep, generator=generator
    )
    return x * mask


class DropPath(DropBase):
    """Drop path (stochastic depth) as a module: ``drop_path`` with ``training=self.training``.

    Huang et al., "Deep Networks with Stochastic Depth" (ECCV 2016). Put it at the end of a
    residual branch: ``x + DropPath(p)(branch(x))``.

    Args:
        p: the probability of *dropping* a sample, in [0, 1]. Default: 0.0.
        mode: ``"row"`` (one draw per sample) or ``"batch"`` (one per call). Default: ``"row"``.
        batch_dim: the dimension that indexes samples. Default: 0.
        scale_by_keep: multiply kept values by ``1 / (1 - p)``. Default: True.

    The settings are plain attributes that may be changed between steps. The module has no
    parameters and no buffers.

    Shape:
        - Input: :math:`(*)`, any shape with at least one dimension.
        - Output: :math:`(*)`, the same shape.

    Examples:
        >>> import torch
        >>> from droppath import DropPath
        >>> m = DropPath(p=0.2)
        >>> m
        DropPath(p=0.2, mode='row', batch_dim=0, scale_by_keep=True)
        >>> m(torch.randn(8, 16)).shape
        torch.Size([8, 16])
        >>> x = torch.randn(8, 16)
        >>> m.eval()(x) is x
        True
    """

    def __init__(
        self, p: float = 0.0, *, mode: str = "row", batch_dim: int = 0, scale_by_keep: bool = True
    ) -> None:
        super().__init__(DropSpec(p, mode, batch_dim, scale_by_keep))

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x):  # torch.fx: one node that follows train() / eval(), see droppath._fx
            node: Tensor = module_node(self, x, lambda training: self._call(x, training))
            return node
        return self._call(x, self.training)

    def _call(self, x: Tensor, training: Any) -> Tensor:
        return drop_path(
            x,
            self.p,
            training,
            mode=self.mode,
            batch_dim=self.batch_dim,
            scale_by_keep=self.scale_by_keep,
        )
