"""Layer drop: stochastic depth over whole layers that take more than one input.

A transformer layer ``L(x, *args, **kwargs) = x + f(x, ...)`` (a Hugging Face decoder layer, say)
is skipped for a random subset of the samples: dropped samples pass through unchanged, kept samples
run ``L`` on the kept subset only, with every batch-shaped argument (attention masks, position
embeddings, ...) gathered the same way. LayerDrop (Fan et al., ICLR 2020), Progressive Layer
Dropping (Zhang & He, NeurIPS 2020) and LayerSkip (Elhoushi et al., ACL 2024) train this way.

- :class:`LayerDrop` wraps a layer (its state dict gains the prefix ``layer.``).
- :func:`layer_drop` turns the layers of a model's layer stack into layer-drop sites in place,
  keeping every state-dict key, parameter object and class name: a pretrained checkpoint loads with
  ``strict=True``, and the model saves and reloads as a plain one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from droppath._checks import (
    MODES,
    check_bool,
    check_choice,
    check_drop_args,
    check_input,
    check_int,
    check_model,
    check_probability,
)
from droppath.drop import _DropBase
from droppath.rates import DEFAULT_RULE, resolve_rates
from droppath.residual import _draw_gate, _draw_rows, _eager, _host_side, _skip, _split

__all__ = ["LayerDrop", "SkippedLayer", "layer_drop"]

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


def _gather(obj: Any, idx: Tensor, n: int, dim: int, min_dims: int = 2) -> Any:
    """``obj`` with every tensor of at least ``min_dims`` dimensions whose size along ``dim`` is
    ``n`` taken at rows ``idx`` (marked dynamic along ``dim`` for torch.compile), inside tuples,
    lists and dicts too; everything else as it is.

    1-D tensors are left alone: in transformer layers they index positions (``cache_position``),
    and a sequence as long as the batch would otherwise be cut. Derived forwards
    (``droppath._derived_ops``) use it with ``min_dims=3`` first, for the same reason with
    ``(tokens, dim)`` tables.
    """
    if isinstance(obj, Tensor):
        if obj.dim() >= min_dims and obj.dim() > dim and obj.shape[dim] == n:
            rows = obj.index_select(dim, idx)
            torch._dynamo.maybe_mark_dynamic(rows, dim)
            return rows
        return obj
    if isinstance(obj, tuple | list):
        items = [_gather(o, idx, n, dim, min_dims) for o in obj]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        return {k: _gather(v, idx, n, dim, min_dims) for k, v in obj.items()}
    return obj
    if isinstance(obj, tuple | list):
        items = [_gather(o, idx, n, dim) for o in obj]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        return {k: _gather(v, idx, n, dim) for k, v in obj.items()}
    return obj


# The keyword arguments that hand a layer a key/value cache, in Hugging Face's current and
# earlier releases.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _cache_passed(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether the call hands the layer a key/value cache, or asks it for one (``use_cache``).

    The cache must then receive every sample's keys and values: a layer that ran on a subset
    would store a partial batch, which the next step (generation, even in train mode) cannot
    extend.
    """
    if kwargs.get("use_cache") is True or any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return True
    return any(
        not isinstance(v, Tensor) and callable(getattr(v, "get_seq_length", None))
        for v in (*args, *kwargs.values())
    )


_CACHE_WARNING = (
    "a layer-drop layer was given a key/value cache in training, so it ran for every sample (a "
    "cache must hold the keys and values of the whole batch). To drop layers in training, pass "
    "use_cache=False to the forward or set model.config.use_cache = False (generate keeps "
    "its cache)."
)


def _hidden(out: Any) -> Tensor:
    """The hidden states in a layer's output: the tensor, or the first item of a tuple."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        "layer output must be a tensor or a tuple whose first item is the hidden states, got "
        f"{type(out).__name__}"
    )


def _with_hidden(out: Any, hidden: Tensor) -> Any:
    """``out`` with its hidden states replaced by ``hidden``."""
    if isinstance(out, Tensor):
        return hidden
    items = [hidden, *out[1:]]
    return type(out)(items) if not hasattr(out, "_fields") else type(out)(*items)


def _passthrough(x: Tensor, template: Any, layer: nn.Module | None) -> Any:
    """The output of a step that drops every sample: ``x``, shaped like the layer's output."""
    x = _skip(x, layer) if layer is not None else x
    if template is None or template == 0:
        return x
    return (x, *([None] * (template - 1)))


def _template(out: Any) -> int:
    """What a dropped step must return: 0 for a tensor, else the tuple's length."""
    return 0 if isinstance(out, Tensor) else len(out)


@_eager
def _merge(
    x_all: Tensor, rows: Tensor, out_rows: Tensor, idx: Tensor, dim: int, s: float
) -> Tensor:
    """``x_all`` with rows ``idx`` set to ``rows + s * (out_rows - rows)``, exactly ``out_rows``
    when ``s`` is 1 (``lerp`` returns its end point at weight 1)."""
    k = idx.shape[0]
    if out_rows.shape[dim] > k:  # rows run only to avoid a batch of one
        out_rows, rows = out_rows.narrow(dim, 0, k), rows.narrow(dim, 0, k)
    if out_rows.shape != rows.shape:
        raise ValueError(
            f"layer output must have the shape of its input, got {tuple(out_rows.shape)} for "
            f"an input of shape {tuple(rows.shape)}"
        )
    new = torch.lerp(rows.to(out_rows.dtype), out_rows, s) if s != 1.0 else out_rows
    return x_all.to(new.dtype).index_copy(dim, idx, new)


@_host_side
def _drop_layer(
    fn: Callable[..., Any],
    x: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    settings: LayerDropSettings,
    owner: nn.Module | None,
    generator: torch.Generator | None = None,
) -> Any:
    """One training call of a layer-drop site (see :class:`LayerDrop`)."""
    dim = check_input(x, settings.batch_dim, "hidden_states")
    p = check_drop_args(settings.p, settings.mode, settings.scale_by_keep)
    if p == 0.0:
        return _call(fn, x, args, kwargs, settings, dim)
    if _cache_passed(args, kwargs):
        warnings.warn(_CACHE_WARNING, UserWarning, stacklevel=1)
        return _call(fn, x, args, kwargs, settings, dim)
    keep = 1.0 - p
    scale = 1.0 / keep if settings.scale_by_keep and keep > 0.0 else 1.0
    if keep == 0.0 or (settings.mode == "batch" and not _draw_gate(keep, generator)):
        return _passthrough(x, settings.template, owner)
    n = x.shape[dim]
    if settings.mode == "row":
        idx, run = _draw_rows(n, keep, x.device, generator, None)
        k = idx.shape[0]
        if k == 0:
            return _passthrough(x, settings.template, owner)
    if settings.mode == "batch" or k == n:
        out = _call(fn, x, args, kwargs, settings, dim)
        if scale == 1.0:
            return out
        return _with_hidden(out, torch.lerp(x.to(_hidden(out).dtype), _hidden(out), scale))
    x_all, rows = _split(x, run, dim)
    out = _call(fn, rows, _gather(args, run, n, dim), _gather(kwargs, run, n, dim), settings, dim)
    return _with_hidden(out, _merge(x_all, rows, _hidden(out), idx, dim, scale))


@_host_side
def _call(
    fn: Callable[..., Any],
    x: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    settings: LayerDropSettings,
    dim: int,
) -> Any:
    """``fn(x, *args, **kwargs)``, remembering the output's structure for dropped steps. The
    batch dimension is marked dynamic first, so that under torch.compile every subset size
    reuses the graph of ``_compiled_call``."""
    x = x.view_as(x)  # mark an alias, never the caller's tensor
    torch._dynamo.maybe_mark_dynamic(x, dim)
    out = _compiled_call(fn, x, args, kwargs)
    settings.template = _template(out)
    return out


def _compiled_call(fn: Callable[..., Any], x: Tensor, args: Any, kwargs: Any) -> Any:
    """Under torch.compile, one graph: the layer inlined."""
    return fn(x, *args, **kwargs)


@dataclass
class LayerDropSettings:
    """The settings of a layer-drop site; ``template`` is learnt from the layer's output."""

    p: float = 0.0
    mode: str = "row"
    batch_dim: int = 0
    scale_by_keep: bool = True
    template: int | None = None


class LayerDrop(_DropBase):
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
    Draws are made on the host, as :class:`droppath.Residual` makes them (no device
    synchronization, replayed by checkpointing), and skipped parameters get zero gradients in a
    distributed run. Other outputs of a tuple (attention weights, say) come from the kept samples
    only; a step that drops every sample returns ``None`` for them.

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
        super().__init__(p, mode, batch_dim, scale_by_keep)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
        self.layer = layer
        self._template: int | None = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.training:
            return self.layer(x, *args, **kwargs)
        settings = LayerDropSettings(
            self.p, self.mode, self.batch_dim, self.scale_by_keep, self._template
        )
        out = _drop_layer(self.layer, x, args, kwargs, settings, self.layer)
        self._template = settings.template
        return out


class _LayerDropSite:
    """Mixed into the class of a layer by :func:`layer_drop`: its ``forward`` becomes a layer-drop
    site's, with the settings in ``self.layer_drop``; ``p`` reads and sets the rate."""

    layer_drop: LayerDropSettings
    training: bool

    @property
    def p(self) -> float:
        return self.layer_drop.p

    @p.setter
    def p(self, value: float) -> None:
        self.layer_drop.p = check_probability(value)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The site class is made at run time under its layer class's name, so pickle could not
        # find it by name: rebuild it from the layer class instead (torch.save of a whole model).
        return (_rebuild_site, (type(self).__bases__[1],), self.__dict__)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        forward = super().forward  # type: ignore[misc]
        if not self.training:
            return forward(x, *args, **kwargs)
        return _drop_layer(forward, x, args, kwargs, self.layer_drop, self)  # type: ignore[arg-type]


_SITE_CLASSES: dict[type, type] = {}


def _site_class(cls: type) -> type:
    """``cls`` with :class:`_LayerDropSite` mixed in, under ``cls``'s own name (code that looks
    for a layer class by name, such as FSDP wrapping policies, still finds it)."""
    if cls not in _SITE_CLASSES:
        site = type(cls.__name__, (_LayerDropSite, cls), {"__module__": cls.__module__})
        site.__qualname__ = cls.__qualname__
        _SITE_CLASSES[cls] = site
    return _SITE_CLASSES[cls]


def layer_output_template(module: nn.Module) -> int | None:
    """The output structure a layer-drop site has seen (0: a tensor, k: a k-tuple), or None."""
    if isinstance(module, LayerDrop):
        return module._template
    settings = getattr(module, "layer_drop", None)
    return settings.template if isinstance(settings, LayerDropSettings) else None


class SkippedLayer(nn.Module):
    """A layer removed by :func:`droppath.prune`: returns its hidden states unchanged (in a tuple
    padded with ``None`` when the removed layer returned a tuple)."""

    def __init__(self, template: int | None = None) -> None:
        super().__init__()
        self.template = template

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return _passthrough(x, self.template, None)


def _rebuild_site(layer_class: type) -> Any:
    """An empty layer-drop site of ``layer_class``, for unpickling (its state comes next)."""
    site = _site_class(layer_class)
    return object.__new__(site)


def is_layer_drop_site(module: nn.Module) -> bool:
    """Whether ``module`` is a :class:`LayerDrop` or a layer that :func:`layer_drop` converted."""
    return isinstance(module, LayerDrop | _LayerDropSite)


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


def _named_stack(model: nn.Module, layers: Any) -> tuple[str, nn.ModuleList]:
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

    Each layer computes as :class:`LayerDrop` does, with rates by ``rule`` across depth. The
    layers stay where they are, with their class name, parameters and buffers: ``state_dict()``
    keys and ``named_parameters()`` are unchanged, a checkpoint of the plain model loads with
    ``strict=True``, and the model's own save (``save_pretrained``) writes a plain checkpoint.
    ``set_drop_rates``, ``DropRateScheduler`` and ``prune`` see the layers as drop-path sites
    (``prune`` deletes a Hugging Face model's layers and updates its config, so that
    ``save_pretrained`` writes the pruned model). Calling it again on the same model changes the
    settings. A layer handed a key/value cache runs for every sample (see :class:`LayerDrop`):
    train with ``use_cache=False`` or ``model.config.use_cache = False``.

    Args:
        model: a model with a layer stack, e.g. a Hugging Face causal LM (Llama-family
            ``model.layers``, GPT-2 ``transformer.h``; see ``STACK_PATHS``).
        p: the largest rate for ``rule`` (see :func:`droppath.depth_rates`), or one rate per layer.
        rule: a depth rule of :func:`droppath.depth_rates`. ``"model"`` keeps the rates of layers
            that are layer-drop sites already (a second call), scaled to ``p``, and is
            ``"linspace"`` for a stack without them. Default: ``"model"``.
        layers: the stack, as an ``nn.ModuleList`` of ``model`` or its qualified name. Default:
            found by ``STACK_PATHS``.
        mode: ``"row"`` or ``"batch"``. Default: ``"row"``.
        scale_by_keep: see :class:`LayerDrop`. Default: True.
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
    check_choice(mode, "mode", MODES)
    check_bool(scale_by_keep, "scale_by_keep")
    check_int(batch_dim, "batch_dim")
    name, stack = _named_stack(model, layers)
    names = [f"{name}.{i}" if name else str(i) for i in range(len(stack))]
    profile = [layer.p if isinstance(layer, _LayerDropSite) else 0.0 for layer in stack]
    rates = resolve_rates(len(stack), p, rule, profile)
    for layer, rate in zip(stack, rates, strict=True):
        if not isinstance(layer, _LayerDropSite):
            layer.__class__ = _site_class(type(layer))
            layer.layer_drop = LayerDropSettings()  # type: ignore[assignment]
        settings: LayerDropSettings = layer.layer_drop  # type: ignore[assignment]
        settings.p, settings.mode = rate, mode
        settings.batch_dim, settings.scale_by_keep = batch_dim, scale_by_keep
    return list(zip(names, rates, strict=True))
