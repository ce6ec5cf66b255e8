"""The training step of a layer-drop site (see ``droppath.layerdrop``).

A layer ``L(x, *args, **kwargs) = x + f(x, ...)`` takes ``droppath._engine.skip_add`` as a
residual does, with two differences: its call (``LayerCall``) gathers every batch-shaped
argument with the kept rows, and its combination is the engine's ``Lerp``: a kept row becomes
``lerp(x, L(x), scale)``, exactly ``L(x)`` when ``scale`` is 1. A layer handed a key/value cache
runs for every sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from droppath._checks import check_input
from droppath._engine import (
    LERP,
    Drawn,
    DropSpec,
    ahead_rows,
    check_shape,
    eager,
    gather,
    host_side,
    skip_add,
)
from droppath._warn import warn

__all__ = ["CACHE_KWARGS", "LayerCall", "ahead_layer", "cache_passed", "drop_layer", "passthrough"]

# The keyword arguments that hand a layer a key/value cache, in Hugging Face's current and
# earlier releases.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_passed(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether the call hands the layer a key/value cache, or asks it for one (``use_cache``).

    The cache must then receive every sample's keys and values: a layer that ran on a subset
    would store a partial batch, which the next step (generation, even in train mode) cannot
    extend.
    """
    if kwargs.get("use_cache") is True or any(kwargs.get(k) is not None for k in CACHE_KWARGS):
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
    """``out`` with its hidden states replaced by ``hidden`` (``out`` itself when they are
    its own)."""
    if isinstance(out, Tensor):
        return hidden
    if hidden is out[0]:
        return out
    items = [hidden, *out[1:]]
    return type(out)(items) if not hasattr(out, "_fields") else type(out)(*items)


def passthrough(x: Tensor, template: int | None) -> Any:
    """The output of a step that drops every sample: ``x``, shaped like the layer's output."""
    if template is None or template == 0:
        return x
    return (x, *([None] * (template - 1)))


def _template(out: Any) -> int:
    """What a dropped step must return: 0 for a tensor, else the tuple's length."""
    return 0 if isinstance(out, Tensor) else len(out)


class LayerCall:
    """One call of a layer, ``fn(x, *args, **kwargs)``, as the branch of ``skip_add``: it returns
    the hidden states and keeps the whole output in ``out`` (None until the layer runs)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        owner: nn.Module,
    ) -> None:
        self.fn, self.x, self.args, self.kwargs, self.owner = fn, x, args, kwargs, owner
        self.out: Any = None

    def __call__(self, x: Tensor) -> Tensor:
        self.out = self.fn(x, *self.args, **self.kwargs)
        return _hidden(self.out)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The layer's parameters, which get zero gradients when it is skipped."""
        return self.owner.parameters()

    def modules(self) -> Iterator[nn.Module]:
        """The layer's modules (a layer that communicates must run on every rank)."""
        return self.owner.modules()

    @eager
    def at_rows(self, run: Tensor, dim: int) -> LayerCall:
        """This call for the rows ``run`` of the batch: every batch-shaped argument gathered."""
        n = self.x.shape[dim]
        self.args = gather(self.args, run, n, dim)
        self.kwargs = gather(self.kwargs, run, n, dim)
        return self


@host_side
def drop_layer(call: LayerCall, spec: DropSpec, template: int | None) -> tuple[Any, int | None]:
    """One training call of a layer-drop site with settings ``spec``: the layer's output, and the
    structure of its outputs (``template``, learnt from the last call that ran the layer)."""
    check_input(call.x, spec.batch_dim, "hidden_states")
    if spec.p > 0.0 and cache_passed(call.args, call.kwargs):
        warn(_CACHE_WARNING)
        spec = replace(spec, p=0.0)
    hidden = skip_add(call.x, call, spec, combine=LERP)
    if call.out is None:  # every sample dropped: the layer never ran
        return passthrough(hidden, template), template
    return _with_hidden(call.out, hidden), _template(call.out)


def ahead_layer(call: LayerCall, drawn: Drawn, dim: int) -> tuple[Any, int]:
    """A training call of a layer-drop site under decisions drawn ahead (``droppath.draw_ahead``):
    the layer's output and the structure of its outputs, as ``drop_layer`` returns them.

    Traceable: the layer runs on ``drawn.run``'s rows, its batch-shaped arguments gathered at
    them, and a kept row becomes ``lerp(x, L(x), scale)`` (a gather, forward and backward), so
    that under torch.compile the step is part of the model's graph. The caller checks first
    that no key/value cache is passed (``cache_passed``), which takes the host-side step."""
    n = call.x.shape[dim]
    args = gather(call.args, drawn.run, n, dim, mark=False)
    kwargs = gather(call.kwargs, drawn.run, n, dim, mark=False)
    rows = ahead_rows(call.x, drawn, dim)
    out = call.fn(rows, *args, **kwargs)
    hidden = _hidden(out)
    check_shape(hidden, rows)
    return _with_hidden(out, LERP.ahead(call.x, hidden, drawn, dim)), _template(out)
