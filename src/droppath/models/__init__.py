"""Reference models built on ``droppath.Residual``: the paper's CIFAR ResNets and a small ViT."""

from droppath.models.registry import MODEL_NAMES, build_model
from droppath.models.resnet import (
    CifarResNet,
    DownsampleShortcut,
    basic_block,
    bottleneck_block,
    cifar_resnet,
)
from droppath.models.vit import AttentionBranch, SmallViT, mlp_branch

__all__ = [
    "MODEL_NAMES",
    "AttentionBranch",
    "CifarResNet",
    "DownsampleShortcut",
    "SmallViT",
    "basic_block",
    "bottleneck_block",
    "build_model",
    "cifar_resnet",
    "mlp_branch",
]
