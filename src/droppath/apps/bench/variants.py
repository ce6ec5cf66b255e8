"""The variants a bench compares, declared once as data (``Variant``), and the rewriting
that makes a copy of the model compute as one of them."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from droppath.acceleration import accelerate
from droppath.apps.bench.baselines import (
    MaskMultiplyResidual,
    PlainResidual,
    TorchtuneLayerDropout,
)
from droppath.apps.bench.library_models import LanguageModelLoss, LibraryModel
from droppath.residual import Residual
from droppath.site_rates import set_drop_rates

__all__ = ["Variant", "variant_model", "variants"]


@dataclass(frozen=True)
class Variant:
    """One way to compute the model: a label for the table and what it means."""

    label: str
    # "plain", "mask-multiply", "residual", "torchtune", "layer_drop", or for a library model
    # "original" and "accelerate"
    kind: str
    strategy: str = "auto"
    p_zero: bool = False  # Residual with every rate set to 0: its overhead when nothing drops
    bucket: int | None = None


def variants(
    mode: str, bucket: int | None = None, kind: str = "mlp", *, compiled: bool = False
) -> list[Variant]:
    """The variants a bench run compares, the baseline first. ``compiled``: under torch.compile,
    which torchtune's ``LayerDropout`` does not survive on a Hugging Face model (it gathers the
    hidden states alone, and the 4-D attention mask that Hugging Face builds while tracing keeps
    the whole batch): it is left out."""
    if kind == "model":
        return [
            Variant("original", "original"),
            Variant("accelerate", "accelerate"),
            Variant("accelerate p=0", "accelerate", p_zero=True),
        ]
    if kind == "llama":
        return [
            Variant("plain", "plain"),
            *([] if compiled else [Variant("torchtune LayerDropout", "torchtune")]),
            Variant("layer_drop", "layer_drop"),
            Variant("layer_drop p=0", "layer_drop", p_zero=True),
        ]
    out = [Variant("plain", "plain"), Variant("mask-multiply", "mask-multiply")]
    if mode == "batch":
        out.append(Variant("Residual", "residual"))
    else:
        out += [
            Variant(f"Residual {s}", "residual", strategy=s) for s in ("mask", "subset", "auto")
        ]
        if bucket is not None:
            out.append(Variant(f"Residual bucket={bucket}", "residual", "subset", bucket=bucket))
    out.append(Variant("Residual p=0", "residual", p_zero=True))
    return out


def _layer_variant(
    model: LanguageModelLoss, variant: Variant, rates: list[float]
) -> LanguageModelLoss:
    """The language model computing as ``variant``: its layers plain, wrapped in torchtune's
    ``LayerDropout``, or made layer-drop sites by ``droppath.layer_drop``."""
    from droppath.layerdrop import find_layer_stack, layer_drop

    _, stack = find_layer_stack(model.lm)
    if variant.kind == "torchtune":
        for i, rate in enumerate(rates):
            stack[i] = TorchtuneLayerDropout(stack[i], rate, seed=i)
    elif variant.kind == "layer_drop":
        layer_drop(model.lm, [0.0] * len(rates) if variant.p_zero else rates)
    return model


def variant_model(
    model: nn.Module, variant: Variant, rates: list[float] | None = None
) -> nn.Module:
    """A copy of ``model`` whose ``Residual`` blocks compute as ``variant``.

    The copy shares the parameters and buffers of ``model``: every variant computes with the same
    tensors in memory, so none is favoured by where its weights happen to lie.
    """
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = copy.deepcopy(model, memo=shared)
    if isinstance(out, LanguageModelLoss):
        return _layer_variant(out, variant, rates or [])
    if isinstance(out, LibraryModel):
        if variant.kind == "accelerate":
            accelerate(out.net)
            if variant.p_zero:
                set_drop_rates(out.net, 0.0)
        return out
    for parent in list(out.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, Residual):
                continue
            if variant.kind == "plain":
                setattr(parent, child_name, PlainResidual(child))
            elif variant.kind == "mask-multiply":
                setattr(parent, child_name, MaskMultiplyResidual(child))
            else:
                child.strategy, child.bucket = variant.strategy, variant.bucket
                if variant.p_zero:
                    child.p = 0.0
    return out
