"""Helper methods that hold the sites, inlined into ``forward`` before the rewrite.

Some blocks call their drop path from a method of their own (timm's aligned Xception:
``return self._residual(self.stack(x), x)``, whose ``_residual`` calls ``self.drop_path``). A
statement of ``forward`` that is such a call, as a whole (``return self.h(...)`` or
``y = self.h(...)``), is replaced by the method's body: its parameters assigned from the call's
arguments, in order, every local name of the method renamed so that none meets a name of
``forward``, and its final ``return`` assigned or returned. Only plain methods qualify: positional
arguments that match their parameters, one ``return``, the last statement, no ``yield``, no
closure, defined in the module of ``forward`` (the generated code runs in its globals).
"""

from __future__ import annotations

import ast
import copy
import inspect
import textwrap
import types
from collections.abc import Collection

from droppath._derive.forms import calls_in

__all__ = ["inline_expressions", "inline_helpers"]

_PREFIX = "_inlined_{}_"  # not "__droppath_": that marks the rewrite's own names


def inline_helpers(
    cls: type, forward: types.FunctionType, body: list[ast.stmt], sites: Collection[str]
) -> list[ast.stmt]:
    """``body`` with each statement that calls a site-holding helper method replaced by the
    helper's statements; ``body`` itself when none qualifies."""
    out: list[ast.stmt] = []
    for stmt in body:
        inlined = _inline(cls, forward, stmt, sites)
        out.extend([stmt] if inlined is None else inlined)
    return out


def inline_expressions(
    cls: type, forward: types.FunctionType, body: list[ast.stmt], sites: Collection[str]
) -> list[ast.stmt]:
    """``body`` with each call, inside an expression, of a site-holding helper that is one
    ``return`` of an expression replaced by that expression (``_Expressions``), at any depth;
    ``body`` itself when there is none."""
    expressions = _Expressions(cls, forward, sites)
    out = [expressions.visit(copy.deepcopy(stmt)) for stmt in body]
    return out if expressions.done else body


class _Expressions(ast.NodeTransformer):
    """MONAI's Swin blocks: ``x = x + self.forward_part2(x)``, whose helper is
    ``return self.drop_path(self.mlp(self.norm2(x)))``. A call ``self.h(a, b)`` anywhere in an
    expression, of a helper whose body is one ``return e`` that calls a site, with plain names
    as arguments, becomes ``e`` with the helper's parameters replaced by those names: the same
    evaluation, since a name evaluates to the same object wherever it is read."""

    def __init__(self, cls: type, forward: types.FunctionType, sites: Collection[str]) -> None:
        self.cls, self.forward, self.sites, self.done = cls, forward, sites, False

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        f = node.func
        if not (
            isinstance(f, ast.Attribute)
            and isinstance(f.value, ast.Name)
            and f.value.id == "self"
            and not node.keywords
            and all(isinstance(a, ast.Name) for a in node.args)
        ):
            return node
        fdef = _method(self.cls, f.attr, self.forward)
        if fdef is None:
            return node
        body = fdef.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]
        params = [p.arg for p in fdef.args.args]
        if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
            return node
        if not params or params[0] != "self" or len(params) - 1 != len(node.args):
            return node
        if not calls_in(ast.Module(body=body, type_ignores=[]), self.sites):
            return node
        names = {
            p: a.id for p, a in zip(params[1:], node.args, strict=True) if isinstance(a, ast.Name)
        }
        self.done = True
        expr: ast.expr = _Substitute(names).visit(body[0].value)  # a fresh tree per call
        return ast.copy_location(expr, node)


class _Substitute(ast.NodeTransformer):
    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if node.id in self.names:
            return ast.copy_location(ast.Name(self.names[node.id], node.ctx), node)
        return node


def _helper_call(stmt: ast.stmt) -> tuple[str, list[ast.expr]] | None:
    """``self.h(a, b)`` as a statement's whole value: the name and the arguments."""
    value = stmt.value if isinstance(stmt, ast.Return | ast.Assign) else None
    if isinstance(stmt, ast.Assign) and not (
        len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
    ):
        return None
    if not (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and isinstance(value.func.value, ast.Name)
        and value.func.value.id == "self"
        and not value.keywords
        and not any(isinstance(a, ast.Starred) for a in value.args)
    ):
        return None
    return value.func.attr, list(value.args)


def _method(cls: type, name: str, forward: types.FunctionType) -> ast.FunctionDef | None:
    """The syntax tree of plain method ``name`` of ``cls``, if it can be inlined."""
    fn = inspect.getattr_static(cls, name, None)
    if not isinstance(fn, types.FunctionType) or fn.__globals__ is not forward.__globals__:
        return None
    if fn.__code__.co_freevars:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        return None
    a = fdef.args
    if a.posonlyargs or a.vararg or a.kwarg or a.kwonlyargs or a.defaults:
        return None
    returns = [n for n in ast.walk(fdef) if isinstance(n, ast.Return)]
    if len(returns) != 1 or fdef.body[-1] is not returns[0] or returns[0].value is None:
        return None
    if any(isinstance(n, ast.Yield | ast.YieldFrom | ast.Lambda) for n in ast.walk(fdef)):
        return None
    return fdef


class _Rename(ast.NodeTransformer):
    def __init__(self, names: set[str], prefix: str) -> None:
        self.names, self.prefix = names, prefix

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if node.id in self.names:
            return ast.copy_location(ast.Name(self.prefix + node.id, node.ctx), node)
        return node


def _inline(
    cls: type, forward: types.FunctionType, stmt: ast.stmt, sites: Collection[str]
) -> list[ast.stmt] | None:
    call = _helper_call(stmt)
    if call is None:
        return None
    name, args = call
    fdef = _method(cls, name, forward)
    if fdef is None:
        return None
    params = [p.arg for p in fdef.args.args]
    if not params or params[0] != "self" or len(params) - 1 != len(args):
        return None
    body = fdef.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if not calls_in(ast.Module(body=body, type_ignores=[]), sites):
        return None
    stored = (n for s in body for n in ast.walk(s) if isinstance(n, ast.Name))
    local = set(params[1:]) | {n.id for n in stored if isinstance(n.ctx, ast.Store)}
    rename = _Rename(local, _PREFIX.format(name.strip("_")))
    new = [rename.visit(s) for s in body]
    last = new.pop()
    assert isinstance(last, ast.Return) and last.value is not None
    bound: list[ast.stmt] = [
        ast.Assign(targets=[ast.Name(rename.prefix + p, ast.Store())], value=a)
        for p, a in zip(params[1:], args, strict=True)
    ]
    if isinstance(stmt, ast.Return):
        end: ast.stmt = ast.Return(value=last.value)
    else:
        assert isinstance(stmt, ast.Assign)
        end = ast.Assign(targets=stmt.targets, value=last.value)
    return [ast.fix_missing_locations(s) for s in (*bound, *new, end)]
