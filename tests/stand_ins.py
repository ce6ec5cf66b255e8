"""Stand-ins for the drop-path modules of timm, torchvision and Hugging Face (same class names
and attributes as theirs, found the same way), and small models built from them, for the tests of
``droppath.sites``, ``droppath.scheduler``, ``droppath.pruning`` and ``droppath.rates``."""

from torch import nn

from droppath import DropPath, Residual, drop_path_sites
from droppath.sites import site_rate


class TimmDropPath(nn.Module):
    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        return x


TimmDropPath.__name__ = "DropPath"  # timm.layers.DropPath


class StochasticDepth(nn.Module):  # torchvision.ops.StochasticDepth
    def __init__(self, p, mode):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x):
        return x


class ConvNextDropPath(nn.Module):  # transformers' *DropPath
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


def mixed_model():
    return nn.Sequential(
        Residual(nn.Linear(4, 4)),
        nn.Sequential(nn.Linear(4, 4), TimmDropPath(0.1)),
        StochasticDepth(0.2, "batch"),
        nn.ReLU(),
        ConvNextDropPath(0.3),
        DropPath(0.4),
    )


def residual_stack(n=4):
    return nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(n)])


class TimmBlock(nn.Module):
    """A timm-style block: the library puts its DropPath in the slot only for a rate above 0."""

    def __init__(self, p=0.0):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_path = TimmDropPath(p) if p > 0 else nn.Identity()

    def forward(self, x):
        return x + self.drop_path(self.fc(x))


def timm_style(rates=(0.0, 0.1, 0.2, 0.3)):
    return nn.Sequential(*[TimmBlock(p) for p in rates])


def rates_in_use(model):
    """The rate each drop-path site of ``model`` holds now, by name."""
    return {name: site_rate(site) for name, site in drop_path_sites(model)}
