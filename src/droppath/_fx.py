"""How droppath's ops and modules appear in ``torch.fx`` graphs.

A drop-path decision is made at run time and depends on ``training`` and the rate, so a symbolic
tracer must not run it: it records one node instead, in the way ``nn.Dropout`` appears.

- A ``DropPath`` or ``Residual`` inside the traced model becomes one ``call_module`` node, as a
  leaf module of ``torch.nn`` does. The traced ``GraphModule`` holds the module itself, so it
  follows ``train()`` / ``eval()`` and a schedule that changes its rate, and a ``Residual`` still
  skips the dropped work (its branch runs inside the node: FX does not see into it).
- A ``DropPath`` or ``Residual`` traced as the root becomes one ``call_function`` node whose
  ``training`` argument is read from the ``GraphModule`` at run time (a ``get_attr`` node), so
  the graph follows ``train()`` / ``eval()`` as well.
- ``drop_path`` and ``drop_add_residual`` called from user code become ``call_function`` nodes
  with the arguments given (``training=self.training`` is then fixed when tracing, as for
  ``torch.nn.functional.dropout``). A branch that is a submodule of the traced model is passed
  to the node by reference; any other branch is traced into the graph, followed by ``drop_path``
  (the same distribution, computed without the saving).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn


def is_proxy(x: object) -> bool:
    """Whether ``x`` is a value being traced by ``torch.fx``."""
    return isinstance(x, fx.Proxy)


def _path(tracer: Any, module: nn.Module) -> str | None:
    """The qualified name of ``module`` in the traced root (``""`` for the root), or None."""
    try:
        path: str = tracer.path_of_module(module)
        return path
    except NameError:
        return None


# Proxies stand in for tensors in the code being traced: these helpers take and return Any.
def function_node(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Record ``fn(*args, **kwargs)`` as one node of the graph that ``args[0]`` belongs to."""
    proxy: fx.Proxy = args[0]
    return proxy.tracer.create_proxy("call_function", fn, args, kwargs)


def module_reference(x: Any, module: nn.Module | None) -> Any:
    """A ``get_attr`` node for a submodule of the traced root, or None if it is not one."""
    if module is None:
        return None
    path = _path(x.tracer, module)
    if not path:
        return None
    return x.tracer.create_proxy("get_attr", path, (), {})


def module_node(module: nn.Module, x: Any, root_call: Callable[[Any], Any]) -> Any:
    """Record a call of ``module`` on ``x``: a ``call_module`` node, or, when ``module`` is the
    traced root, ``root_call(training)`` with ``training`` read from the ``GraphModule``."""
    tracer = x.tracer
    path = _path(tracer, module)
    if path:
        return tracer.create_proxy("call_module", path, (x,), {})
    return root_call(tracer.create_proxy("get_attr", "training", (), {}))
