"""Where a model's layer stack is: the ``nn.ModuleList`` that ``layer_drop`` and ``prune`` work
on, found at the usual places of Hugging Face models or named by the caller."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["STACK_PATHS", "find_layer_stack", "named_stack"]

# Where the layer stacks of common Hugging Face models live, tried in this order.
STACK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi (the causal LM's inner model)
    "layers",  # the inner model itself
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "h",
    "gpt_neox.layers",
    "model.decoder.layers",  # OPT
    "decoder.layers",
)


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The layer stack of a Hugging Face model: the first of ``STACK_PATHS`` that is an
    ``nn.ModuleList``, with its qualified name."""
    for path in STACK_PATHS:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList) and len(stack) > 0:
            return path, stack
    raise ValueError(
        f"layers must name the model's layer stack (an nn.ModuleList): none found at "
        f"{', '.join(STACK_PATHS)} of this {type(model).__name__}"
    )


def _module_lists(model: nn.Module) -> str:
    """The non-empty ``nn.ModuleList`` s of ``model`` by name, for an error message."""
    names = [repr(n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"its nn.ModuleLists are {shown}" if names else "it has no nn.ModuleList"


def named_stack(model: nn.Module, layers: Any) -> tuple[str, nn.ModuleList]:
    """The stack ``layers`` names (or is), with its qualified name; errors name ``layers``."""
    if layers is None:
        return find_layer_stack(model)
    if isinstance(layers, str):
        try:
            stack = model.get_submodule(layers)
        except AttributeError:
            raise ValueError(
                f"layers must name a non-empty nn.ModuleList of the model, got {layers!r}, which "
                f"names no submodule of this {type(model).__name__}; {_module_lists(model)}"
            ) from None
        name = layers
    elif isinstance(layers, nn.Module):
        stack = layers
        found = next((n for n, m in model.named_modules() if m is layers), None)
        if found is None:
            raise ValueError(
                f"layers must be a non-empty nn.ModuleList of the model, got a "
                f"{type(layers).__name__} that is not part of this {type(model).__name__}; "
                f"{_module_lists(model)}"
            )
        name = found
    else:
        raise TypeError(
            f"layers must be None, a qualified name or an nn.ModuleList of the model, got "
            f"{type(layers).__name__}"
        )
    if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
        raise ValueError(
            f"layers must be a non-empty nn.ModuleList of the model, got {name!r}, a "
            f"{type(stack).__name__}{' of length 0' if isinstance(stack, nn.ModuleList) else ''}"
            f"; {_module_lists(model)}"
        )
    return name, stack
