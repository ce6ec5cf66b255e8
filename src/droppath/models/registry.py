"""Build a reference model by name, for the command-line tools."""

from __future__ import annotations

from typing import Any

from torch import nn

from droppath.models.resnet import CifarResNet
from droppath.models.vit import SmallViT

__all__ = ["MODEL_NAMES", "build_model"]

MODEL_NAMES = ("resnet", "vit")


def build_model(
    name: str,
    *,
    depth: int | None = None,
    num_classes: int,
    in_channels: int,
    image_size: int,
    **drop: Any,
) -> nn.Module:
    """A reference model for images of ``image_size`` with ``in_channels`` channels.

    ``name`` is ``"resnet"`` (``CifarResNet``, ``depth`` 6n + 2, default 110) or ``"vit"``
    (``SmallViT``, ``depth`` blocks, default 6); ``drop`` holds ``p``, ``rule``, ``mode`` and
    ``strategy``.
    """
    if name == "resnet":
        return CifarResNet(depth or 110, num_classes, in_channels, **drop)
    if name == "vit":
        patch = 4 if image_size >= 32 else 2
        return SmallViT(image_size, patch, in_channels, num_classes, depth=depth or 6, **drop)
    allowed = ", ".join(repr(n) for n in MODEL_NAMES)
    raise ValueError(f"model must be one of {allowed}, got {name!r}")
