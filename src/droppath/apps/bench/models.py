"""The model a bench times and its input: a stack of droppath's blocks (``mlp``, ``attn``,
``conv``, ``vit``), a small Llama (``llama``) or a library's model (``model``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from droppath.apps.bench.config import BenchConfig
from droppath.apps.bench.library_models import build_library_model, build_llama
from droppath.models.resnet import CifarResNet
from droppath.models.vit import AttentionBranch, SmallViT, mlp_branch
from droppath.rates import depth_rates
from droppath.residual import Residual

__all__ = ["build_model"]


def build_model(cfg: BenchConfig) -> tuple[nn.Module, Tensor]:
    """``cfg``'s model, with ``Residual`` blocks at the depth rule's rates, and its input."""
    if cfg.kind == "model":
        return build_library_model(cfg)
    if cfg.kind == "llama":
        return build_llama(cfg)
    rates = depth_rates(cfg.depth or 1, cfg.p, cfg.rule or "uniform")
    width = cfg.width or 1
    if cfg.kind == "conv":
        model: nn.Module = CifarResNet(
            2 * (cfg.depth or 3) + 2,
            widths=(width, 2 * width, 4 * width),
            mode=cfg.mode or "row",
        )
        blocks = [m for m in model.modules() if isinstance(m, Residual)]
        for block, rate in zip(blocks, rates, strict=True):
            block.p = rate
        x = torch.randn(cfg.batch or 1, 3, 32, 32)
        return model, x
    if cfg.kind == "vit":  # a small ViT on 32x32 images: patch 4, 64 tokens + class token
        heads = max(1, width // 64)
        vit = SmallViT(
            dim=width, depth=cfg.depth or 1, heads=heads, p=cfg.p, rule=cfg.rule or "uniform"
        )
        for site in vit.modules():
            if isinstance(site, Residual):
                site.mode = cfg.mode or "row"
        return vit, torch.randn(cfg.batch or 1, 3, 32, 32)
    heads = max(1, width // 64)
    make: Callable[[], nn.Module]
    if cfg.kind == "mlp":
        make = lambda: mlp_branch(width, 4 * width)  # noqa: E731
    else:
        make = lambda: AttentionBranch(width, heads)  # noqa: E731
    model = nn.Sequential(*[Residual(make(), rate, mode=cfg.mode or "row") for rate in rates])
    return model, torch.randn(cfg.batch or 1, cfg.tokens or 1, width)
