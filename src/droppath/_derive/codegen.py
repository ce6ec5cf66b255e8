"""Code generation: the rewritten forward and its branches, compiled into one function.

The branches and the forward are defined inside a factory whose parameters bind the run-time
ops (``droppath._derive.ops``) and the class (for ``super()``), under names out of any
library's way; the factory's code runs with the forward's own globals.
"""

from __future__ import annotations

import ast
import hashlib
import linecache
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from droppath._derive.ahead_ops import AHEAD_OPS
from droppath._derive.errors import DeriveError
from droppath._derive.ops import add, radd, rows
from droppath._derive.source import Source
from droppath._derive.terms import ADD, RADD, ROWS, Branch, Output
from droppath._engine import host_side

__all__ = ["Derived", "generate"]

_CLS = "__droppath_cls"


@dataclass(frozen=True)
class Derived:
    """A derived training forward: ``forward(block, *args, **kwargs)``, the sites it rewrote, and
    its source code (for reading; the function is compiled from the syntax tree)."""

    forward: Callable[..., Any]
    sites: tuple[str, ...]
    source: str
    # the same code with the ops that read decisions drawn ahead (droppath.draw_ahead): traceable
    traced: Callable[..., Any] | None = None


class _Super(ast.NodeTransformer):
    """``super()`` becomes ``super(<the class>, self)``: the code runs outside the class."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not node.args:
            node.args = [ast.Name(_CLS, ast.Load()), ast.Name("self", ast.Load())]
        return node


def _strip(args: ast.arguments) -> None:
    """No annotations, and placeholder defaults (the function gets the original's values)."""
    for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
        if a is not None:
            a.annotation = None
    args.defaults = [ast.Constant(None) for _ in args.defaults]
    args.kw_defaults = [None if d is None else ast.Constant(None) for d in args.kw_defaults]


def _function(name: str, params: list[str], body: list[ast.stmt]) -> ast.FunctionDef:
    args = ast.arguments(
        posonlyargs=[],
        args=[ast.arg(p) for p in params],
        kwonlyargs=[],
        kw_defaults=[],
        defaults=[],
    )
    return ast.FunctionDef(name=name, args=args, body=body, decorator_list=[], returns=None)


def _module(fdef: ast.FunctionDef, branches: list[Branch]) -> ast.Module:
    """The factory that defines the branches and the forward and returns the forward."""
    funcs: list[ast.stmt] = [
        _function(br.name, br.params, [*br.body, ast.Return(br.value)]) for br in branches
    ]
    factory = _function(
        "__droppath_factory",
        [ADD, RADD, ROWS, _CLS],
        [*funcs, fdef, ast.Return(ast.Name("forward", ast.Load()))],
    )
    module = ast.Module(body=[_Super().visit(factory)], type_ignores=[])
    ast.fix_missing_locations(module)
    return module


def generate(cls: type, source: Source, body: list[ast.stmt], output: Output) -> Derived:
    """The forward of ``source`` with the rewritten ``body`` and the branches of ``output``,
    compiled. Raises ``DeriveError`` if the generated code does not compile."""
    fdef, fn = source.tree, source.fn
    fdef.body = body
    fdef.decorator_list = []
    fdef.returns = None
    _strip(fdef.args)
    fdef.name = "forward"
    module = _module(fdef, output.branches)
    text = ast.unparse(module)
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    filename = f"<droppath derived {cls.__module__}.{cls.__qualname__}.forward {digest}>"
    try:
        code = compile(text, filename, "exec")  # from its text: tracebacks show its lines
    except (SyntaxError, ValueError, TypeError) as error:
        raise DeriveError("rewrite", f"the generated code does not compile ({error})") from None
    # registered as torch.fx registers its generated code: a traceback raised inside a derived
    # forward shows the line, and inspect.getsource finds it (linecache keeps entries without a
    # modification time)
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    factory_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    make = types.FunctionType(factory_code, fn.__globals__)
    # its own code runs on the host under torch.compile, as drop_add_residual's step does: the
    # branches and modules it calls compile as graphs of their own (droppath._engine.host_side)
    forward, traced = make(add, radd, rows, cls), make(*AHEAD_OPS, cls)
    for f in (forward, traced):
        f.__defaults__ = fn.__defaults__
        f.__kwdefaults__ = fn.__kwdefaults__
        f.__qualname__ = f"{cls.__qualname__}.forward"
    sites_done = tuple(sorted(output.rewritten - output.kept))
    return Derived(host_side(forward), sites_done, text, traced)
