"""Pruning for inference: ``prune`` removes for good the blocks with the highest rates.

Each removed block becomes what it computes when dropped: its shortcut, or its input for a layer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from droppath._checks import check_model, check_positive_int
from droppath.layerdrop import (
    SkippedLayer,
    find_layer_stack,
    is_layer_drop_site,
    layer_output_template,
)
from droppath.residual import Residual
from droppath.sites import drop_path_sites

__all__ = ["prune"]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pruned(block: nn.Module) -> nn.Module:
    """What a removed block becomes: what it computes when its branch or layer is dropped."""
    if isinstance(block, Residual):
        return block.shortcut if block.shortcut is not None else nn.Identity()
    return SkippedLayer(layer_output_template(block))


def _hf_stack(model: nn.Module) -> tuple[str, nn.ModuleList, Any] | None:
    """The layer stack of a Hugging Face decoder-only model and the config that counts it
    (``num_hidden_layers`` equal to its length), or None: layers pruned from it are removed from
    the list and the config, so that ``save_pretrained`` writes a model that loads as pruned."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or getattr(config, "is_encoder_decoder", False):
        return None
    try:
        name, stack = find_layer_stack(model)
    except ValueError:
        return None
    return (name, stack, config) if len(stack) == n else None


def _remove_layers(stack: nn.ModuleList, config: Any, removed: set[int]) -> None:
    """Delete layers ``removed`` from ``stack``, renumber the ``layer_idx`` that the remaining
    layers (and their attention) index the key/value cache with, and update ``config``: its
    layer count and each per-layer list (a list attribute with "layer" in its name and one entry
    per layer, such as ``layer_types``)."""
    n = len(stack)
    kept = [i for i in range(n) if i not in removed]
    for new, old in enumerate(kept):
        for module in stack[old].modules():
            if getattr(module, "layer_idx", None) == old:
                setattr(module, "layer_idx", new)  # noqa: B010 (mypy: not a Module or Tensor)
    for i in sorted(removed, reverse=True):
        del stack[i]
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, list | tuple) and len(value) == n:
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)


def prune(model: nn.Module, k: int) -> dict[str, Any]:
    """Remove for good the ``k`` ``Residual`` blocks or layer-drop layers with the highest rate.

    Each removed block becomes its shortcut alone (``nn.Identity`` when it has none), and a layer
    a ``SkippedLayer`` that returns its input: what they compute when dropped. A model trained
    with stochastic depth keeps working, cheaper, at inference (Fan et al., "Reducing Transformer
    Depth on Demand with Structured Dropout", ICLR 2020). Ties go to the deeper block.

    Layers of a Hugging Face decoder-only model (the stack ``droppath.layer_drop`` finds,
    counted by ``config.num_hidden_layers``) are deleted from their ``nn.ModuleList`` instead: the
    remaining layers are renumbered (state-dict keys and the ``layer_idx`` of the key/value cache),
    and the config's layer count and per-layer lists (``layer_types``, ...) follow, so that
    ``save_pretrained`` writes the pruned model and ``from_pretrained`` loads it back as it is.
    Only droppath's ``Residual`` blocks and layer-drop layers can be pruned: drop paths inside
    other blocks (timm's, or those ``droppath.accelerate`` runs) cannot.

    Args:
        model: a model containing ``droppath.Residual`` blocks or layer-drop sites; changed in
            place.
        k: how many blocks to remove, from 0 to the number of blocks.

    Returns:
        ``{"blocks_removed": [names], "parameters_removed": int, "parameters_left": int}``, the
        names as they were before the call.

    Examples:
        >>> from torch import nn
        >>> from droppath import Residual, prune, set_drop_rates
        >>> model = nn.Sequential(*[Residual(nn.Linear(4, 4)) for _ in range(4)])
        >>> _ = set_drop_rates(model, 0.5, rule="linear")
        >>> prune(model, 2)
        {'blocks_removed': ['3', '2'], 'parameters_removed': 40, 'parameters_left': 40}
        >>> model[3]
        Identity()
    """
    check_model(model, "prune")
    blocks = [
        (name, m)
        for name, m in model.named_modules()
        if name and (isinstance(m, Residual) or is_layer_drop_site(m))
    ]
    k = check_positive_int(k, "k", minimum=0)
    if k > len(blocks):
        if not blocks:
            others = sorted({type(m).__name__ for _, m in drop_path_sites(model)})
            has = f"drop-path modules ({', '.join(others)}) inside its blocks" if others else "none"
            raise ValueError(
                f"k must be 0 for this {type(model).__name__}, got {k}: prune removes only "
                f"droppath Residual blocks and layer-drop layers (layer_drop), and it has "
                f"neither (it has {has})"
            )
        raise ValueError(f"k must be in [0, {len(blocks)}] for this model, got {k}")
    order = sorted(range(len(blocks)), key=lambda i: (-blocks[i][1].p, -i))
    before = _count(model)
    hf = _hf_stack(model)
    from_stack: set[int] = set()
    removed = []
    for i in order[:k]:
        name, block = blocks[i]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if hf is not None and parent is hf[1]:
            from_stack.add(int(attr))
        else:
            setattr(parent, attr, _pruned(block))
        removed.append(name)
    if hf is not None and from_stack:
        _remove_layers(hf[1], hf[2], from_stack)
    after = _count(model)
    return {
        "blocks_removed": removed,
        "parameters_removed": before - after,
        "parameters_left": after,
    }
