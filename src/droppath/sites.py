"""Drop-path sites: finding them in any model (``SiteTable``), their rates, and ``convert``.

Drop-path sites are found by duck typing, without importing the libraries that define them:
droppath's ``DropPath`` and ``Residual``; timm's ``DropPath`` (attribute ``drop_prob``);
torchvision's ``StochasticDepth`` (attributes ``p`` and ``mode``); and the ``*DropPath`` classes
of Hugging Face transformers (attribute ``drop_prob``). An empty slot is where those libraries
put no module for a rate of 0 (see ``empty_slots``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from droppath._checks import check_model, check_probability
from droppath._swap import mixed_class
from droppath.drop import DropPath
from droppath.layerdrop import is_layer_drop_site
from droppath.residual import Residual

__all__ = [
    "SiteTable",
    "convert",
    "drop_path_sites",
    "empty_slots",
    "fill_slots",
    "is_drop_path_site",
    "set_site_rate",
    "site_positions",
    "site_rate",
]


def _kind(module: nn.Module) -> str | None:
    """Which attribute holds a drop-path site's rate, or None if ``module`` is not a site."""
    if isinstance(module, DropPath | Residual) or is_layer_drop_site(module):
        return "p"
    name = type(module).__name__
    if name == "StochasticDepth" and hasattr(module, "p") and hasattr(module, "mode"):
        return "p"
    if name.endswith("DropPath") and hasattr(module, "drop_prob"):
        return "drop_prob"
    return None


def drop_path_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every drop-path site of ``model``, in module registration (forward) order.

    Examples:
        >>> from torch import nn
        >>> from droppath import DropPath, Residual, drop_path_sites
        >>> model = nn.Sequential(Residual(nn.Linear(4, 4)), nn.ReLU(), DropPath())
        >>> [name for name, _ in drop_path_sites(model)]
        ['0', '2']
    """
    return [(name, m) for name, m in model.named_modules() if _kind(m) is not None]


def is_drop_path_site(module: nn.Module) -> bool:
    """Whether ``module`` is a drop-path site (one that ``drop_path_sites`` lists)."""
    return _kind(module) is not None


# The attributes where timm, torchvision and Hugging Face keep a block's drop-path module; when a
# block's rate is 0 they hold ``nn.Identity`` (timm, Hugging Face, torchvision's MaxViT) or None
# (timm's ResNet): an empty slot, where a site can be put.
_SLOT_NAME = re.compile(r"(drop_path|stochastic_depth|stochastic_dropout)\d*")
_CONTAINERS = (nn.Sequential, nn.ModuleList)


def empty_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The empty drop-path slots of ``model``: ``(qualified name, owner module, attribute)``.

    A slot is an attribute named ``drop_path*``, ``stochastic_depth*`` or ``stochastic_dropout``
    that holds ``nn.Identity`` or None, where the libraries put no module for a rate of 0.
    """
    return _slots(dict(model.named_modules()))


def _slots(modules: dict[str, nn.Module]) -> list[tuple[str, nn.Module, str]]:
    found = []
    for owner_name, owner in modules.items():
        if isinstance(owner, _CONTAINERS):
            continue
        attrs = [(k, v) for k, v in owner._modules.items()]
        attrs += [(k, v) for k, v in vars(owner).items() if v is None]
        for attr, value in attrs:
            if _SLOT_NAME.fullmatch(attr) and (value is None or type(value) is nn.Identity):
                found.append((f"{owner_name}.{attr}" if owner_name else attr, owner, attr))
    return found


def _block_of(modules: dict[str, nn.Module], name: str, module: nn.Module | None) -> str:
    """The block a site (or empty slot) ``name`` belongs to, for its depth position.

    Libraries give one rate per block (a ViT block's two residuals share it; a MaxViT layer's three
    sub-blocks too). A block is the nearest module, from the site's owner up, that stands in an
    ``nn.Sequential`` or ``nn.ModuleList`` of modules of its own class (a stack of blocks); the
    owner is the site itself when it is a residual block of its own (``Residual``, a layer-drop
    layer) or an element of a container, else the module holding it. Without such a stack, the
    owner is the block.
    """
    parts = name.split(".") if name else []
    stands_alone = module is not None and (
        isinstance(module, Residual) or is_layer_drop_site(module)
    )
    parent = modules.get(".".join(parts[:-1])) if parts else None
    if not stands_alone and not isinstance(parent, _CONTAINERS):
        parts = parts[:-1]
    owner = parts
    while parts:
        container = modules[".".join(parts[:-1])]
        here = modules[".".join(parts)]
        if isinstance(container, _CONTAINERS) and all(
            type(m) is type(here) for m in container.children()
        ):
            return ".".join(parts)
        parts = parts[:-1]
    return ".".join(owner)


@dataclass(frozen=True)
class SiteTable:
    """One walk of a model: its drop-path sites and its empty slots, in forward order, and the
    depth position (block, see ``_block_of``) of each, built once per call and passed down.

    Attributes:
        sites: ``(qualified name, module)`` of every site (``drop_path_sites``).
        slots: ``(qualified name, owner, attribute)`` of every empty slot (``empty_slots``).
        positions: the position of each site and slot, by name; blocks whose slot is empty
            count, so that ``depth_rates`` gives what the libraries compute at build time.
        depth: the number of positions.
    """

    sites: tuple[tuple[str, nn.Module], ...]
    slots: tuple[tuple[str, nn.Module, str], ...]
    positions: dict[str, int]
    depth: int

    @classmethod
    def of(cls, model: nn.Module) -> SiteTable:
        modules = dict(model.named_modules())
        sites = tuple((n, m) for n, m in modules.items() if _kind(m) is not None)
        slots = tuple(_slots(modules))
        blocks = {name: _block_of(modules, name, m) for name, m in sites}
        blocks.update({name: _block_of(modules, name, None) for name, _, _ in slots})
        order = {name: i for i, name in enumerate(modules)}
        every = sorted(set(blocks.values()), key=lambda b: order.get(b, -1))
        index = {block: i for i, block in enumerate(every)}
        return cls(sites, slots, {n: index[b] for n, b in blocks.items()}, len(every))


def site_positions(model: nn.Module, names: Sequence[str]) -> tuple[list[int], int]:
    """The depth position of each site or empty slot in ``names`` and the number of positions
    of ``model`` (``SiteTable``)."""
    table = SiteTable.of(model)
    return [table.positions[name] for name in names], table.depth


def site_rate(site: nn.Module) -> float:
    """The drop rate a site holds now (0 for a timm ``DropPath`` built with ``drop_prob=None``).

    Examples:
        >>> from droppath import DropPath
        >>> from droppath.sites import site_rate
        >>> site_rate(DropPath(0.2))
        0.2
    """
    return float(getattr(site, _kind(site) or "p", 0.0) or 0.0)


def set_site_rate(site: nn.Module, rate: float) -> None:
    """Set the drop rate of ``site`` in the attribute its library keeps it in (``p`` or
    ``drop_prob``); droppath's own modules check it there."""
    setattr(site, _kind(site) or "p", rate)


def fill_slots(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Put a ``droppath.DropPath(0.0)`` in the empty slots ``names`` (default: all) of ``model``.

    The forwards of timm, torchvision and Hugging Face call the slot's module (or skip it when it is
    None), so the block gains a drop-path site; ``state_dict()`` keys are unchanged (the module has
    no parameters and no buffers). Returns the names filled.
    """
    filled = []
    for name, owner, attr in empty_slots(model):
        if names is None or name in names:
            if attr in owner._modules:
                owner._modules[attr] = DropPath(0.0).train(owner.training)
            else:
                delattr(owner, attr)
                owner.add_module(attr, DropPath(0.0).train(owner.training))
            filled.append(name)
    return filled


class _Converted(DropPath):
    """``DropPath`` mixed with the class of the library module it replaced (``convert``)."""

    __repr__ = nn.Module.__repr__  # not torchvision's own, which hides droppath's settings


class _ConvertedDropProb(_Converted):
    """For timm's and Hugging Face's: ``drop_prob`` is ``p`` (as timm-style scripts set it)."""

    @property
    def drop_prob(self) -> float:
        return self.p

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self.p = check_probability(value, "drop_prob")


def _replacement(module: nn.Module) -> DropPath | None:
    if isinstance(module, DropPath | Residual) or is_layer_drop_site(module):
        return None
    kind = _kind(module)
    if kind is None:
        return None
    attrs: dict[str, Any] = vars(module)
    if kind == "drop_prob":  # timm and Hugging Face: per-sample, scaled by the keep rate
        scale = attrs.get("scale_by_keep", True)
        new = DropPath(float(attrs["drop_prob"] or 0.0), scale_by_keep=bool(scale))
        mixin: type = _ConvertedDropProb
    else:  # torchvision: scales when p < 1
        new, mixin = DropPath(float(attrs["p"]), mode=str(attrs["mode"])), _Converted
    with contextlib.suppress(TypeError):  # a class that cannot be mixed (slots): DropPath alone
        new.__class__ = mixed_class(mixin, type(module))  # still an instance of the library's
    return new


def convert(model: nn.Module) -> nn.Module:
    """Replace timm's, torchvision's and Hugging Face's drop-path modules by ``droppath.DropPath``.

    Each replacement has the same rate, mode and scaling, so the model computes the same
    distribution; everything else is left untouched. A replacement is an instance of both
    ``DropPath`` and the library's class, under its name (``isinstance(site, timm.layers.DropPath)``
    holds), and timm's and Hugging Face's ``drop_prob`` is its ``p``, checked when set. The model
    is changed in place and returned (the replacement itself if ``model`` is such a module).

    Examples:
        >>> from torch import nn
        >>> from droppath import DropPath, convert
        >>> class StochasticDepth(nn.Module):  # torchvision's class, as far as convert can tell
        ...     def __init__(self, p, mode):
        ...         super().__init__()
        ...         self.p, self.mode = p, mode
        >>> model = convert(nn.Sequential(nn.Linear(2, 2), StochasticDepth(0.1, "row")))
        >>> model
        Sequential(
          (0): Linear(in_features=2, out_features=2, bias=True)
          (1): StochasticDepth(p=0.1, mode='row', batch_dim=0, scale_by_keep=True)
        )
        >>> isinstance(model[1], DropPath), isinstance(model[1], StochasticDepth)
        (True, True)
    """
    check_model(model, "convert")
    return _convert(model)


def _convert(model: nn.Module) -> nn.Module:
    root = _replacement(model)
    if root is not None:
        return root.train(model.training)
    for name, child in list(model.named_children()):
        new = _replacement(child)
        if new is not None:
            setattr(model, name, new.train(child.training))
        else:
            _convert(child)
    return model
