"""Layer drop: stochastic depth over whole layers that take more than one input.

A transformer layer ``L(x, *args, **kwargs) = x + f(x, ...)`` (a Hugging Face decoder layer, say)
is skipped for a random subset of the samples: dropped samples pass through unchanged, kept samples
run ``L`` on the kept subset only, with every batch-shaped argument (attention masks, position
embeddings, ...) gathered the same way. LayerDrop (Fan et al., ICLR 2020), Progressive Layer
Dropping (Zhang & He, NeurIPS 2020) and LayerSkip (Elhoushi et al., ACL 2024) train this way.

- ``LayerDrop`` wraps a layer (its state dict gains the prefix ``layer.``).
- ``layer_drop`` turns the layers of a model's layer stack into layer-drop sites in place,
  keeping every state-dict key, parameter object and class name: a pretrained checkpoint loads with
  ``strict=True``, and the model saves and reloads as a plain one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from droppath._checks import check_model
from droppath._engine import Drawn, DropBase, DropSpec, fitting, host_side
from droppath._layer_stack import STACK_PATHS, find_layer_stack, named_stack
from droppath._layer_step import (
    CACHE_KWARGS,
    LayerCall,
    ahead_layer,
    cache_passed,
    drop_layer,
    passthrough,
)
from droppath._swap import swap_class
from droppath.rates import DEFAULT_RULE, Rates

__all__ = ["STACK_PATHS", "LayerDrop", "SkippedLayer", "find_layer_stack", "layer_drop"]


class _Setting:
    """A setting of ``LayerDropSettings``: read from its ``spec``; assigning it rebuilds the
    ``spec``, and so checks the value."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, settings: Any, owner: type | None = None) -> Any:
        return self if settings is None else getattr(settings.spec, self.name)

    def __set__(self, settings: Any, value: Any) -> None:
        settings.spec = replace(settings.spec, **{self.name: value})


@dataclass
class LayerDropSettings:
    """The settings of a layer that ``layer_drop`` converted: ``spec``, and its fields as
    attributes; ``template`` is learnt from the layer's output. ``_ahead`` and ``_ahead_rows``
    are what ``droppath.draw_ahead`` keeps for the layer (see ``droppath._engine.DropBase``);
    pickles leave them out."""

    spec: DropSpec = field(default_factory=DropSpec)
    template: int | None = None
    _ahead: Drawn | None = field(default=None, repr=False, compare=False)
    _ahead_rows: tuple[int, torch.device] | None = field(default=None, repr=False, compare=False)
    p = _Setting()
    mode = _Setting()
    batch_dim = _Setting()
    scale_by_keep = _Setting()

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "template": self.template}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec, self.template = state["spec"], state["template"]
        self._ahead = self._ahead_rows = None


class LayerDrop(DropBase):
    """Layer drop: skip a whole layer for a random subset of samples, computing only the kept ones.

    For a layer ``L`` whose output has its input's shape (or is a tuple whose first item has it),
    ``L(x, ...) = x + f(x, ...)``. In training, each sample is kept with probability ``1 - p``
    (``mode="row"``, independent draws) or the whole batch is (``mode="batch"``):

    - a dropped sample passes through unchanged: its output is its input;
    - the kept samples run ``L`` together, alone: ``x`` and every tensor argument of at least two
      dimensions whose size along ``batch_dim`` is the batch size (masks, position embeddings,
      also inside tuples, lists and dicts) are gathered at the kept rows; everything else
      (broadcast masks of batch size 1, 1-D position indices, scalars, ``None``) is passed as is;
    - ``scale_by_keep=True`` (default, unbiased) gives kept samples ``x + (L(x) - x) / (1 - p)``,
      so that the expectation is ``L(x)``, what eval computes; ``False`` gives ``L(x)``, the
      convention of LayerDrop, LayerSkip and torchtune's ``LayerDropout``.

    In eval mode, and whenever a key/value cache is passed or asked for (``use_cache=True``;
    generation, in train mode too), it is exactly ``L``: a cache must hold every sample's keys
    and values. Hugging Face models pass a cache in training too while ``config.use_cache`` is
    on, so pass ``use_cache=False`` in training (or set ``model.config.use_cache = False``;
    ``generate`` keeps its cache); a layer that runs whole for a cache in training warns.
    Draws are made on the host, as ``droppath.Residual`` makes them (no device
    synchronization, replayed by checkpointing), when the layer runs or, under
    ``droppath.draw_ahead``, before the model's forward (one graph under ``torch.compile``), and
    skipped parameters get zero gradients, as the mask gives them. Other outputs of a tuple
    (attention weights, say) come from the kept samples only; a step that drops every sample
    returns ``None`` for them, or, before the layer has ever run in training, the hidden states
    alone (it cannot know the tuple yet; under ``draw_ahead`` the layer always runs).

    Args:
        layer: the layer, stored as ``self.layer``.
        p: the probability of dropping the layer for a sample, in [0, 1]. Default: 0.0.
        mode: ``"row"`` (one draw per sample) or ``"batch"`` (one per call). Default: ``"row"``.
        batch_dim: the dimension of the hidden states that indexes samples. Default: 0.
        scale_by_keep: scale the layer's change of kept samples by ``1 / (1 - p)``. Default: True.

    Shape:
        - Input: hidden states :math:`(N, *)` (batch at ``batch_dim``), then the layer's other
          arguments.
        - Output: the layer's output, hidden states of the input's shape.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from droppath import LayerDrop
        >>> class Layer(nn.Module):  # a layer with a second, batch-shaped input
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(4, 4)
        ...     def forward(self, x, mask):
        ...         return x + self.lin(x) * mask
        >>> site = LayerDrop(Layer(), p=0.5)
        >>> site
        LayerDrop(
          p=0.5, mode='row', batch_dim=0, scale_by_keep=True
          (layer): Layer(...)
        )
        >>> x, mask = torch.randn(8, 3, 4), torch.ones(8, 3, 1)
        >>> site(x, mask).shape
        torch.Size([8, 3, 4])
        >>> torch.equal(site.eval()(x, mask), site.layer(x, mask))
        True
    """

    def __init__(
        self,
        layer: nn.Module,
        p: float = 0.0,
        *,
        mode: str = "row",
        batch_dim: int = 0,
        scale_by_keep: bool = True,
    ) -> None:
        super().__init__(DropSpec(p, mode, batch_dim, scale_by_keep))
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
        self.layer = layer
        self.template: int | None = None  # the structure of the layer's output, once seen

    _measures = False  # a layer is large next to a gather and a scatter: always the subset

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.training:
            return self.layer(x, *args, **kwargs)
        return _layer_step(self, self.layer, self.layer, x, args, kwargs)


def _layer_step(
    holder: Any,
    forward: Callable[..., Any],
    owner: nn.Module,
    x: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """A training call of a layer-drop site of either form, ``forward(x, *args, **kwargs)``:
    ``holder`` keeps the settings (``spec``), the decisions drawn ahead and the output's
    structure (``template``): a ``LayerDrop`` itself, or a converted layer's
    ``LayerDropSettings``; ``owner`` holds the layer's parameters."""
    dim = fitting(holder._ahead, x, holder.spec.batch_dim)  # decisions drawn before the forward
    if dim is not None and not cache_passed(args, kwargs):  # (draw_ahead): in the graph
        call = LayerCall(forward, x, args, kwargs, owner=owner)
        out, holder.template = ahead_layer(call, holder._ahead, dim)
        return out
    return _host_step(holder, forward, owner, x, args, kwargs)


@host_side
def _host_step(
    holder: Any,
    forward: Callable[..., Any],
    owner: nn.Module,
    x: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """A training call of a layer-drop site, its settings read on the host (see
    ``droppath.residual``)."""
    call = LayerCall(forward, x, args, kwargs, owner=owner)
    holder._ahead_rows = _rows_seen(x, holder.spec)
    out, holder.template = drop_layer(call, holder.spec, holder.template)
    return out


def _rows_seen(x: Tensor, spec: DropSpec) -> tuple[int, torch.device] | None:
    """The batch size and device of a host-side step's hidden states, which ``draw_ahead``
    draws the next decisions for."""
    return (x.shape[spec.batch_dim % x.dim()], x.device) if x.dim() else None


class _LayerDropSite:
    """Mixed into the class of a layer by ``layer_drop``: its ``forward`` becomes a layer-drop
    site's, with the settings in ``self.layer_drop``; ``p`` reads and sets the rate."""

    layer_drop: LayerDropSettings
    training: bool

    @property
    def p(self) -> float:
        return self.layer_drop.spec.p

    @p.setter
    def p(self, value: float) -> None:
        self.layer_drop.p = value

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        forward = super().forward  # type: ignore[misc]  # the layer's own
        if not self.training:
            return forward(x, *args, **kwargs)
        return _layer_step(self.layer_drop, forward, self, x, args, kwargs)  # type: ignore[arg-type]


def _holder(module: nn.Module) -> Any:
    """What holds a layer-drop site's settings, decisions drawn ahead and output structure: a
    ``LayerDrop`` itself, a converted layer's ``layer_drop`` settings; None for another module."""
    if isinstance(module, LayerDrop):
        return module
    return module.layer_drop if isinstance(module, _LayerDropSite) else None


def layer_drop_holders(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """The layer-drop sites of ``model`` with what holds each one's settings and the decisions
    ``droppath.draw_ahead`` draws for it (``spec``, ``_ahead``, ``_ahead_rows``)."""
    return [(m, h) for m in model.modules() if (h := _holder(m)) is not None]


def layer_drop_spec(module: nn.Module) -> DropSpec:
    """The settings of a layer-drop site: a ``LayerDrop`` or a converted layer."""
    holder = _holder(module)
    if holder is None:
        raise TypeError(f"module must be a layer-drop site, got {type(module).__name__}")
    spec: DropSpec = holder.spec
    return spec


def layer_output_template(module: nn.Module) -> int | None:
    """The output structure a layer-drop site has seen (0: a tensor, k: a k-tuple), or None."""
    holder = _holder(module)
    return None if holder is None else holder.template


class SkippedLayer(nn.Module):
    """A layer removed by ``droppath.prune``: returns its hidden states unchanged (in a tuple
    padded with ``None`` when the removed layer returned a tuple)."""

    def __init__(self, template: int | None = None) -> None:
        super().__init__()
        self.template = template

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return passthrough(x, self.template)


def is_layer_drop_site(module: nn.Module) -> bool:
    """Whether ``module`` is a ``LayerDrop`` or a layer that ``layer_drop`` converted."""
    return isinstance(module, LayerDrop | _LayerDropSite)


def layer_drop(
    model: nn.Module,
    p: float | Sequence[float],
    rule: str = DEFAULT_RULE,
    *,
    layers: str | nn.ModuleList | None = None,
    mode: str = "row",
    scale_by_keep: bool = True,
    batch_dim: int = 0,
) -> list[tuple[str, float]]:
    """Make every layer of a model's layer stack a layer-drop site, in place.

    Each layer computes as ``LayerDrop`` does, with rates by ``rule`` across depth. The
    layers stay where they are, with their class name, parameters and buffers: ``state_dict()``
    keys and ``named_parameters()`` are unchanged, a checkpoint of the plain model loads with
    ``strict=True``, and the model's own save (``save_pretrained``) writes a plain checkpoint.
    ``set_drop_rates``, ``DropRateScheduler`` and ``prune`` see the layers as drop-path sites
    (``prune`` deletes a Hugging Face model's layers and updates its config, so that
    ``save_pretrained`` writes the pruned model). Calling it again on the same model changes the
    settings. A layer handed a key/value cache runs for every sample (see ``LayerDrop``); a
    training forward of ``model`` to which you pass no cache and no ``use_cache`` runs with
    ``use_cache=False`` whatever its config says (``train_without_cache``), so pretrained
    configs, which all say ``use_cache=True``, drop layers in training as they are.

    Args:
        model: a model with a layer stack, e.g. a Hugging Face causal LM (Llama-family
            ``model.layers``, GPT-2 ``transformer.h``; see ``STACK_PATHS``).
        p: the largest rate for ``rule`` (see ``droppath.depth_rates``), or one rate per layer.
        rule: a depth rule of ``droppath.depth_rates``. ``"model"`` keeps the rates of layers
            that are layer-drop sites already (a second call), scaled to ``p``, and is
            ``"linspace"`` for a stack without them. Default: ``"model"``.
        layers: the stack, as an ``nn.ModuleList`` of ``model`` or its qualified name. Default:
            found by ``STACK_PATHS``.
        mode: ``"row"`` or ``"batch"``. Default: ``"row"``.
        scale_by_keep: see ``LayerDrop``. Default: True.
        batch_dim: the dimension of the hidden states that indexes samples. Default: 0.

    Returns:
        ``(qualified name, rate)`` of every layer, from the input side.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from droppath import layer_drop
        >>> class Layer(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(4, 4)
        ...     def forward(self, x, mask=None):
        ...         return x + self.lin(x)
        >>> model = nn.Module()
        >>> model.layers = nn.ModuleList(Layer() for _ in range(4))
        >>> layer_drop(model, 0.2, "uniform")
        [('layers.0', 0.2), ('layers.1', 0.2), ('layers.2', 0.2), ('layers.3', 0.2)]
        >>> type(model.layers[0]).__name__, list(model.state_dict())[:2]
        ('Layer', ['layers.0.lin.weight', 'layers.0.lin.bias'])
    """
    check_model(model, "layer_drop")
    checked = DropSpec(0.0, mode, batch_dim, scale_by_keep)  # before the stack is looked for
    name, stack = named_stack(model, layers)
    names = [f"{name}.{i}" if name else str(i) for i in range(len(stack))]
    profile = [layer.p if isinstance(layer, _LayerDropSite) else 0.0 for layer in stack]
    rates = Rates.of(p, rule).per_position(len(stack), profile)
    for layer, rate in zip(stack, rates, strict=True):
        spec = replace(checked, p=rate)
        if isinstance(layer, _LayerDropSite):
            layer.layer_drop.spec = spec
        else:
            swap_class(layer, _LayerDropSite)
            layer.layer_drop = LayerDropSettings(spec)  # type: ignore[assignment]
    if _takes_use_cache(type(model)) and train_without_cache not in _pre_hooks(model):
        model.register_forward_pre_hook(train_without_cache, with_kwargs=True)
    return list(zip(names, rates, strict=True))


def _pre_hooks(model: nn.Module) -> list[Any]:
    return list(model._forward_pre_hooks.values())


_TAKES_USE_CACHE: dict[type, bool] = {}


def _takes_use_cache(cls: type) -> bool:
    """Whether ``cls.forward`` has a ``use_cache`` parameter (a Hugging Face model's)."""
    if cls not in _TAKES_USE_CACHE:
        try:
            found = "use_cache" in inspect.signature(cast(Any, cls).forward).parameters
        except (TypeError, ValueError, AttributeError):
            found = False
        _TAKES_USE_CACHE[cls] = found
    return _TAKES_USE_CACHE[cls]


def train_without_cache(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A forward pre-hook of a model that ``layer_drop`` converted: a training forward with
    gradients, to which the caller passed no cache and no ``use_cache``, runs with
    ``use_cache=False``, whatever the config says (as transformers does under gradient
    checkpointing), so that its layers drop samples instead of filling a cache for the whole
    batch. A cache or ``use_cache=True`` passed by the caller is kept (the layers then run
    whole)."""
    if not model.training or not torch.is_grad_enabled() or "use_cache" in kwargs:
        return None
    if any(kwargs.get(k) is not None for k in CACHE_KWARGS):
        return None
    return args, {**kwargs, "use_cache": False}
