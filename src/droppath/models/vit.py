"""A small Vision Transformer whose attention and MLP branches are ``Residual`` blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from droppath._checks import check_positive_int
from droppath.rates import depth_rates
from droppath.residual import Residual

__all__ = ["AttentionBranch", "SmallViT", "mlp_branch"]


class AttentionBranch(nn.Module):
    """Pre-norm self-attention branch: ``attn(norm(x))``, tokens ``(N, T, D)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        out: Tensor = self.attn(h, h, h, need_weights=False)[0]
        return out


def mlp_branch(dim: int, hidden: int) -> nn.Sequential:
    """Pre-norm MLP branch: ``fc2(gelu(fc1(norm(x))))``."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
    )


class SmallViT(nn.Module):
    """A pre-norm ViT (Dosovitskiy et al. 2021) sized for 32x32 or 8x8 images.

    Each transformer block is two ``droppath.Residual`` sites, attention then MLP, that share
    the block's rate; rates rise across blocks by the depth rule, as in DeiT and timm.

    Args:
        image_size: the side of the square input. Default: 32.
        patch_size: the side of a patch; must divide ``image_size``. Default: 4 (use 2 for 8x8).
        in_channels: image channels. Default: 3.
        num_classes: classifier outputs. Default: 10.
        dim: token width. Default: 192.
        depth: transformer blocks. Default: 6.
        heads: attention heads. Default: 3.
        mlp_ratio: hidden width of the MLP over ``dim``. Default: 4.
        p: the drop rate of the last block. Default: 0.1.
        rule: the depth rule. Default: ``"linear"``.
        mode: ``"row"`` or ``"batch"``. Default: ``"row"``.
        strategy: the row-mode strategy. Default: ``"auto"``.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)` with ``H = W = image_size``.
        - Output: :math:`(N, \\text{num\\_classes})`.

    Examples:
        >>> import torch
        >>> from droppath.models import SmallViT
        >>> SmallViT(image_size=8, patch_size=2, in_channels=1, dim=48, depth=2)(
        ...     torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        *,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: int = 4,
        p: float = 0.1,
        rule: str = "linear",
        mode: str = "row",
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        image_size = check_positive_int(image_size, "image_size")
        patch_size = check_positive_int(patch_size, "patch_size")
        if image_size % patch_size:
            raise ValueError(f"patch_size must divide image_size ({image_size}), got {patch_size}")
        tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        blocks: list[nn.Module] = []
        for rate in depth_rates(check_positive_int(depth, "depth"), p, rule):
            for branch in (AttentionBranch(dim, heads), mlp_branch(dim, dim * mlp_ratio)):
                blocks.append(Residual(branch, rate, mode=mode, strategy=strategy))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        out: Tensor = self.head(self.norm(self.blocks(tokens))[:, 0])
        return out
