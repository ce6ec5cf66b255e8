"""The CIFAR ResNets of Huang et al. (2016) with stochastic depth, and a bottleneck block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from droppath._checks import check_choice, check_positive_int
from droppath.rates import DEPTH_RULES, depth_rates
from droppath.residual import Residual

__all__ = ["CifarResNet", "DownsampleShortcut", "basic_block", "bottleneck_block", "cifar_resnet"]


class DownsampleShortcut(nn.Module):
    """The parameter-free shortcut of the paper's CIFAR ResNets where the shape changes.

    Subsamples by ``stride`` and pads the new channels with zeros ("option A" of He et al. 2016,
    used by Huang et al. 2016), so the shortcut has no weights to train.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


def basic_block(
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    p: float = 0.0,
    *,
    mode: str = "batch",
    strategy: str = "auto",
) -> nn.Sequential:
    """The paper's basic block: ``relu(shortcut(x) + drop(conv-bn-relu-conv-bn(x)))``.

    Returns ``nn.Sequential(Residual(...), nn.ReLU())``: the ReLU comes after the add, and it is
    not in place, because a dropped ``Residual`` returns its input itself.

    Examples:
        >>> import torch
        >>> from droppath.models import basic_block
        >>> basic_block(16, 32, stride=2, p=0.2)(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])
    """
    branch = nn.Sequential(
        *_conv_bn(in_channels, out_channels, 3, stride),
        nn.ReLU(inplace=True),
        *_conv_bn(out_channels, out_channels, 3),
    )
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = DownsampleShortcut(in_channels, out_channels, stride)
    return nn.Sequential(
        Residual(branch, p, shortcut=shortcut, mode=mode, strategy=strategy), nn.ReLU()
    )


def bottleneck_block(
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    p: float = 0.0,
    *,
    reduction: int = 4,
    mode: str = "row",
    strategy: str = "auto",
) -> nn.Sequential:
    """A bottleneck block (1x1 narrow, 3x3, 1x1 wide) with stochastic depth on its branch.

    The tutorial this project grew from built this block with no shortcut when the shape changes,
    a ReLU at the end of the branch (so the branch could only add), and a drop path whose rate
    was passed as the keep probability. Here the shortcut is a 1x1 convolution with batch norm
    where the shape changes, the ReLU comes after the add, and ``Residual`` does the drop.

    Examples:
        >>> import torch
        >>> from droppath.models import bottleneck_block
        >>> bottleneck_block(64, 128, stride=2, p=0.1)(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 128, 4, 4])
    """
    mid = max(1, out_channels // reduction)
    branch = nn.Sequential(
        *_conv_bn(in_channels, mid, 1),
        nn.ReLU(inplace=True),
        *_conv_bn(mid, mid, 3, stride),
        nn.ReLU(inplace=True),
        *_conv_bn(mid, out_channels, 1),
    )
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))
    return nn.Sequential(
        Residual(branch, p, shortcut=shortcut, mode=mode, strategy=strategy), nn.ReLU()
    )


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016) with stochastic depth as in Huang et al. (2016).

    A 3x3 stem, three stages of ``(depth - 2) / 6`` basic blocks with 16, 32 and 64 channels (the
    2nd and 3rd start with a stride-2 block and a zero-padded shortcut), global average pooling and
    a linear classifier. Block ``l`` of ``L`` drops with ``p * l / L`` (the paper's linear rule)
    by default; ``mode="batch"`` drops a block for the whole mini-batch, as the paper did.

    Args:
        depth: 6n + 2: 20, 32, 44, 56, 110, 1202... Default: 110.
        num_classes: classifier outputs. Default: 10.
        in_channels: image channels. Default: 3.
        p: the drop rate of the last block. Default: 0.5 (the paper's choice).
        rule: the depth rule (see ``droppath.depth_rates``). Default: ``"linear"``.
        mode: ``"batch"`` or ``"row"``. Default: ``"batch"``.
        strategy: the row-mode strategy of each ``Residual``. Default: ``"auto"``.
        widths: the channels of the three stages. Default: (16, 32, 64).
        zero_init_residual: start the last batch norm of every branch at zero, so that each block
            begins as its shortcut (Goyal et al. 2017, torchvision's option of the same name).
            Kept branches are scaled by ``1 / (1 - p)`` in training, up to 2x at the paper's
            ``p = 0.5``; without this, ResNet-110 with stochastic depth barely trains in its
            first epochs (measured on the digits demo). Default: True.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`.
        - Output: :math:`(N, \\text{num\\_classes})`.

    Examples:
        >>> import torch
        >>> from droppath.models import CifarResNet
        >>> model = CifarResNet(depth=20, num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> len(model.blocks)
        9
    """

    def __init__(
        self,
        depth: int = 110,
        num_classes: int = 10,
        in_channels: int = 3,
        p: float = 0.5,
        *,
        rule: str = "linear",
        mode: str = "batch",
        strategy: str = "auto",
        widths: tuple[int, int, int] = (16, 32, 64),
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        depth = check_positive_int(depth, "depth", minimum=8)
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        check_choice(rule, "rule", DEPTH_RULES)
        n = (depth - 2) // 6
        rates = depth_rates(3 * n, p, rule)
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0], 3), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                rate = rates[len(blocks)]
                blocks.append(basic_block(cin, width, stride, rate, mode=mode, strategy=strategy))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Residual):
                    last_norm = list(m.branch.children())[-1]
                    assert isinstance(last_norm, nn.BatchNorm2d)
                    nn.init.zeros_(last_norm.weight)

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(self.stem(x))
        out: Tensor = self.head(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
        return out


def cifar_resnet(depth: int = 110, num_classes: int = 10, **kwargs: object) -> CifarResNet:
    """Shorthand for ``CifarResNet``; ``cifar_resnet(110)`` is the paper's ResNet-110."""
    return CifarResNet(depth, num_classes, **kwargs)  # type: ignore[arg-type]
