"""The forms a site is used in: ``self.<site>(e)``, with a row-wise module or a layer scale after
it, added to a shortcut; and the statements that read sizes off a tensor.
"""

from __future__ import annotations

import ast
from collections.abc import Collection

__all__ = [
    "batch_name",
    "calls_in",
    "has_site",
    "is_shape",
    "site_call",
    "site_term",
    "statement_term",
]


def site_call(node: ast.AST, sites: Collection[str]) -> str | None:
    """The site ``node`` calls, if it is ``self.<site>(one argument)``."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
        and node.func.attr in sites
        and len(node.args) == 1
        and not isinstance(node.args[0], ast.Starred)
        and not node.keywords
    ):
        return node.func.attr
    return None


def site_term(node: ast.AST, sites: Collection[str]) -> tuple[str, ast.expr] | None:
    """``(site, branch expression)`` for ``self.<site>(e)`` and ``self.<m>(self.<site>(e))``
    (a row-wise module after the site, part of the branch); None otherwise."""
    site = site_call(node, sites)
    if site is not None:
        assert isinstance(node, ast.Call)
        return site, node.args[0]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
        and len(node.args) == 1
        and not node.keywords
    ):
        inner = site_call(node.args[0], sites)
        if inner is not None:
            call = node.args[0]
            assert isinstance(call, ast.Call)
            post = ast.Call(func=node.func, args=[call.args[0]], keywords=[])
            return inner, post
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        # a layer scale: ``self.gamma * self.drop_path(e)`` (either order)
        for this, other in ((node.right, node.left), (node.left, node.right)):
            inner = site_call(this, sites)
            if inner is not None and _is_scale(other):
                assert isinstance(this, ast.Call)
                parts = (other, this.args[0]) if other is node.left else (this.args[0], other)
                return inner, ast.BinOp(parts[0], ast.Mult(), parts[1])
    return None


def _is_scale(node: ast.expr) -> bool:
    """``self.<attr>`` or a number: the same for every sample."""
    return isinstance(node, ast.Constant) or (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def has_site(stmt: ast.stmt, sites: Collection[str]) -> bool:
    """Whether a statement calls a site, or an op a site was rewritten into."""
    return bool(calls_in(stmt, sites)) or any(
        isinstance(n, ast.Name) and n.id.startswith("__droppath_") for n in ast.walk(stmt)
    )


def calls_in(node: ast.AST, sites: Collection[str]) -> list[ast.Call]:
    """The site calls under ``node``."""
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and site_call(n, sites)]


def statement_term(
    stmt: ast.stmt, sites: Collection[str]
) -> tuple[str, ast.expr, ast.expr | None] | None:
    """The one site term of a simple statement: ``(site, branch expression, base)``; base None
    when the site is not added to a shortcut."""
    calls = calls_in(stmt, sites)
    if len(calls) != 1:
        return None
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
        found = site_term(stmt.value, sites)
        if found is not None:
            return found[0], found[1], stmt.target
    for node in ast.walk(stmt):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            for side, other in ((node.right, node.left), (node.left, node.right)):
                found = site_term(side, sites)
                if found is not None:
                    return found[0], found[1], other
    call = calls[0]
    return str(site_call(call, sites)), call.args[0], None


def batch_name(stmt: ast.Assign) -> str | None:
    """The name a shape statement gives the batch size: ``B`` in ``B, C, H, W = x.shape`` or
    ``B = x.shape[0]`` / ``x.size(0)``."""
    target, value = stmt.targets[0], stmt.value
    if isinstance(target, ast.Tuple) and target.elts and isinstance(target.elts[0], ast.Name):
        if (isinstance(value, ast.Attribute) and value.attr == "shape") or (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr == "size"
            and not value.args
        ):
            return target.elts[0].id
    if isinstance(target, ast.Name):
        text = ast.unparse(value)
        if text.endswith((".shape[0]", ".size(0)")):
            return target.id
    return None


def is_shape(value: ast.expr) -> bool:
    """Whether an expression reads a tensor's sizes (``.shape``, ``.size()``)."""
    for n in ast.walk(value):
        if isinstance(n, ast.Attribute) and n.attr == "shape":
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "size":
            return True
    return False
