"""Verify a derived forward by running it: against the class's own ``forward``, on the block's
real inputs, under the same keep decisions, outputs and input gradients must agree.

During the check the block's submodules run in evaluation mode (dropout off, BatchNorm on its
running statistics, which are not updated) and its drop-path sites are replaced by
``ForcedDrop``, so that the only randomness, the keep decisions, is
the same for both. Nothing of the block changes: modes and sites are restored, no ``.grad`` is
written (``torch.autograd.grad``), and the random state is not touched.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.utils._python_dispatch import _disable_current_modes

from droppath._derive.ops import ForcedDrop
from droppath._engine import eager
from droppath._engine.ranks import sharded_inside
from droppath._warn import warn

_SHARDED_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

__all__ = ["cannot_tell", "unobserved", "verify"]


class _Decisions:
    """Keep decisions replayed in call order: the i-th call gets the same rows in both runs, at
    least one kept and one dropped."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, n: int) -> Tensor:
        g = torch.Generator().manual_seed(7919 + self.calls)
        self.calls += 1
        kept = torch.rand(n, generator=g) < 0.5
        if bool(kept.all()) or not bool(kept.any()):
            kept[0] = ~kept[0]
        return kept


def _leaves(obj: Any, found: list[Tensor]) -> Any:
    """``obj`` with each floating tensor replaced by a fresh copy that requires grad (collected
    in ``found``), inside tuples, lists and dicts too."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            leaf = obj.detach().clone().requires_grad_(True)
            found.append(leaf)
            return leaf.clone()  # not the leaf itself: a forward may add into it in place
        return obj
    if isinstance(obj, tuple | list):
        items = [_leaves(o, found) for o in obj]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        return {k: _leaves(v, found) for k, v in obj.items()}
    return obj


def _flat(obj: Any) -> Iterator[Any]:
    if isinstance(obj, tuple | list):
        for o in obj:
            yield from _flat(o)
    elif isinstance(obj, dict):
        for k in obj:
            yield from _flat(obj[k])
    else:
        yield obj


def _batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for obj in _flat([args, kwargs]):
        if isinstance(obj, Tensor) and obj.is_floating_point() and obj.dim() >= 2:
            return int(obj.shape[0])
    return 0


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def _torch_own(hook: Any) -> bool:
    """Whether a hook is torch's own (FSDP2's unsharding, a parametrization's, spectral norm's):
    the forward needs it. A user's or a library's (transformers' output recorders) is not."""
    fn = getattr(hook, "__func__", hook)
    name = getattr(fn, "__module__", None) or type(fn).__module__
    return name == "torch" or name.startswith("torch.")


@contextmanager
def unobserved(block: nn.Module) -> Iterator[None]:
    """Run the check's extra forwards unseen: no hook of the block's submodules fires but
    torch's own, no global module hook, and no dispatch mode (a FLOP counter, say) records them.
    A call then looks, from outside, like one call of the untouched model."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for m in block.modules():
            if m is block:
                continue
            for attr in _HOOKS:
                hooks = m.__dict__.get(attr)
                if hooks:
                    saved.append((m.__dict__, attr, hooks))
                    m.__dict__[attr] = OrderedDict(
                        (k, h) for k, h in hooks.items() if _torch_own(h)
                    )
        for attr in _GLOBAL_HOOKS:
            hooks = getattr(_module, attr, None)
            if hooks:
                saved.append((vars(_module), attr, hooks))
                setattr(_module, attr, OrderedDict())
        with _disable_current_modes():
            yield
    finally:
        for where, attr, hooks in reversed(saved):
            where[attr] = hooks


@contextmanager
def _checking(block: nn.Module, sites: tuple[str, ...], decide: _Decisions) -> Iterator[None]:
    modes = [(m, m.training) for m in block.modules() if m is not block]
    saved = {s: m for s in sites if (m := block._modules.get(s)) is not None}
    try:
        for m, _ in modes:
            m.training = False
        for s, site in saved.items():
            block._modules[s] = ForcedDrop(site, decide)
        # hooks of our own, so that an enclosing checkpoint's do not capture the check's graph;
        # they keep autograd's guard against tensors changed in place after being saved
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        for s, site in saved.items():
            block._modules[s] = site
        for m, mode in modes:
            m.training = mode


def _pack(t: Tensor) -> tuple[Tensor, int]:
    return t, t._version


def _unpack(saved: tuple[Tensor, int]) -> Tensor:
    t, version = saved
    if t._version != version:
        raise RuntimeError("a tensor needed for the gradient was modified by an in-place operation")
    return t


def _tolerance(t: Tensor, what: str) -> float:
    """Relative to the largest value: a rewrite that is wrong is off by the order of the values;
    the same computation on fewer rows differs by rounding (more in gradients, whose sums run
    in another order)."""
    if t.dtype in (torch.float32, torch.float64):
        return 2e-3 if what == "output" else 1e-2
    return 5e-2


def _compare(what: str, a: Any, b: Any) -> str:
    """An empty string if ``a`` and ``b`` agree, else a short description of the difference."""
    fa, fb = list(_flat(a)), list(_flat(b))
    if len(fa) != len(fb):
        return f"{what}: {len(fb)} items, the original's has {len(fa)}"
    for i, (x, y) in enumerate(zip(fa, fb, strict=True)):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return f"{what} item {i}: a tensor on one side only"
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            continue
        if x.shape != y.shape:
            return f"{what} item {i}: shape {tuple(y.shape)}, the original's {tuple(x.shape)}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return f"{what} item {i} differs"
            continue
        x, y = x.detach().float(), y.detach().float()
        diff = (x - y).abs().max().item() if x.numel() else 0.0
        scale = x.abs().max().item() if x.numel() else 0.0
        tol = _tolerance(fa[i], what)
        if not diff <= tol * (1.0 + scale):
            return f"{what} item {i} differs by {diff:.3g} (scale {scale:.3g})"
    return ""


def _run(
    forward: Callable[..., Any],
    block: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    decide: _Decisions,
) -> tuple[Any, list[Tensor]]:
    leaves: list[Tensor] = []
    a, k = _leaves(args, leaves), _leaves(kwargs, leaves)
    decide.calls = 0
    return forward(block, *a, **k), leaves


def _grads(out: Any, leaves: list[Tensor]) -> list[Tensor]:
    outs = [o for o in _flat(out) if isinstance(o, Tensor) and o.requires_grad]
    if not outs or not leaves:
        return []
    g = torch.Generator().manual_seed(104729)
    cots = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
    pairs = zip(grads, leaves, strict=True)
    return [torch.zeros_like(leaf) if d is None else d for d, leaf in pairs]


def cannot_tell(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call's inputs cannot tell a derived forward from the original: fewer than 2
    samples, inference mode or no gradients (a probe's call; a check asked for, by
    ``droppath.check`` or ``draw_ahead``'s eager run, enables them), tensors on the ``meta``
    device or fake ones (a shape or FLOP probe, a memory estimator under ``FakeTensorMode``)."""
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        return True
    if _batch(args, kwargs) < 2:
        return True
    if torch._guards.detect_fake_mode(list(_flat([args, kwargs]))) is not None:
        return True
    return any(isinstance(t, Tensor) and t.is_meta for t in _flat([args, kwargs]))


@eager
def verify(
    block: nn.Module,
    original: Callable[..., Any],
    derived: Callable[..., Any],
    sites: tuple[str, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> str | None:
    """Check ``derived`` against ``original`` on ``block`` with these inputs.

    Returns "" if they agree, a one-line reason if they do not, and None if these inputs cannot
    tell (``cannot_tell``): the check then waits for another call.
    """
    if cannot_tell(args, kwargs):
        return None
    if sharded_inside(block):  # FSDP's hooks inside: check with droppath.check before sharding
        if block not in _SHARDED_WARNED:
            _SHARDED_WARNED.add(block)
            warn(
                f"droppath.accelerate: {type(block).__qualname__} holds a module sharded by FSDP, "
                "so it cannot check its derived forward inside a training step and runs its own "
                "forward; call droppath.check(model, example_inputs) before sharding to check it"
            )
        return None
    decide = _Decisions()
    with _checking(block, sites, decide), unobserved(block), torch.enable_grad():
        try:
            want, want_leaves = _run(original, block, args, kwargs, decide)
        except Exception as error:  # the original itself fails here: not the rewrite's fault
            return f"verify: the original forward failed ({type(error).__name__}: {error})"
        try:
            got, got_leaves = _run(derived, block, args, kwargs, decide)
        except Exception as error:
            return f"verify: the derived forward raised {type(error).__name__}: {error}"
        reason = _compare("output", want, got)
        if reason:
            return f"verify: {reason}"
        try:
            reason = _compare("input gradient", _grads(want, want_leaves), _grads(got, got_leaves))
        except RuntimeError as error:
            return f"verify: backward failed ({error})"
    return f"verify: {reason}" if reason else ""
