"""What droppath is compared with: the plain residual (no stochastic depth), the mask-multiply
drop path of timm, torchvision and mmcv, and torchtune's ``LayerDropout``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from droppath.residual import Residual

__all__ = ["MaskMultiplyResidual", "PlainResidual", "TorchtuneLayerDropout"]


class PlainResidual(nn.Module):
    """``shortcut(x) + branch(x)``: the baseline with no stochastic depth."""

    def __init__(self, block: Residual) -> None:
        super().__init__()
        self.branch, self.shortcut = block.branch, block.shortcut

    def forward(self, x: Tensor) -> Tensor:
        base = x if self.shortcut is None else self.shortcut(x)
        out: Tensor = base + self.branch(x)
        return out


class MaskMultiplyResidual(PlainResidual):
    """The formulation of timm, torchvision and mmcv: compute every row, multiply by a mask."""

    def __init__(self, block: Residual) -> None:
        super().__init__(block)
        self.p, self.mode = block.p, block.mode

    def forward(self, x: Tensor) -> Tensor:
        base = x if self.shortcut is None else self.shortcut(x)
        out: Tensor = self.branch(x)
        if self.training and self.p > 0.0:
            keep = 1.0 - self.p
            shape = (out.shape[0],) + (1,) * (out.dim() - 1) if self.mode == "row" else (1,)
            mask = out.new_empty(shape).bernoulli_(keep)
            if keep > 0.0:
                mask.div_(keep)
            out = out * mask
        result: Tensor = base + out
        return result


class TorchtuneLayerDropout(nn.Module):
    """torchtune's ``LayerDropout`` (``torchtune/modules/layer_dropout.py``), rewritten here with
    the same behaviour as a baseline: one Bernoulli(``prob``) skip per sample from a CPU generator
    seeded per layer; the layer runs on the kept rows of the hidden states, every other argument
    passed as it is (not gathered); kept rows written into a clone of the input, not rescaled
    (training computes ``x + (1 - p) f(x)`` on average where eval computes ``x + f(x)``)."""

    def __init__(self, layer: nn.Module, prob: float, seed: int) -> None:
        super().__init__()
        self.layer, self.prob = layer, prob
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.prob == 0 or not self.training:
            return self.layer(x, *args, **kwargs)
        n = x.shape[0]
        skip = torch.bernoulli(torch.full((n,), self.prob), generator=self.generator)
        selected = (skip == 0).nonzero().squeeze(1).to(x.device)
        out = x.clone()
        if selected.numel() > 0:
            out[selected] = self.layer(x.index_select(0, selected), *args, **kwargs)
        return out
