"""What a statement does with names: what it assigns, what it reads, what it surely replaces,
and which names stay live after it. The region walk asks these questions before it moves a
statement into a branch.
"""

from __future__ import annotations

import ast

__all__ = [
    "effects",
    "escapes",
    "full_assigns",
    "loads",
    "read_after",
    "read_later",
    "sequence",
    "sure",
    "targets",
]


def targets(node: ast.AST) -> tuple[set[str], set[str]]:
    """Names a store target assigns, and names it reads (``x[i] = ...`` reads and changes x)."""
    if isinstance(node, ast.Name):
        return {node.id}, set()
    if isinstance(node, ast.Tuple | ast.List):
        out: tuple[set[str], set[str]] = (set(), set())
        for elt in node.elts:
            a, r = targets(elt)
            out[0].update(a)
            out[1].update(r)
        return out
    if isinstance(node, ast.Starred):
        return targets(node.value)
    if isinstance(node, ast.Subscript | ast.Attribute):
        reads = loads(node)
        root = node.value
        while isinstance(root, ast.Subscript | ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name):
            return {root.id}, reads | {root.id}
        return set(), reads
    return set(), loads(node)


def loads(node: ast.AST) -> set[str]:
    """Names a node reads."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def effects(stmt: ast.stmt) -> tuple[set[str], set[str]]:
    """``(assigned, read)`` names of a statement. A compound statement reads what its parts
    read before they assign it (``if c: h = f(x); y = g(h)`` reads c, x, not h)."""
    if isinstance(stmt, ast.If | ast.For | ast.While | ast.With | ast.Try):
        head: list[ast.AST] = []
        assigned: set[str] = set()
        if isinstance(stmt, ast.If | ast.While):
            head = [stmt.test]
        elif isinstance(stmt, ast.For):
            head = [stmt.iter]
            assigned |= targets(stmt.target)[0]
        elif isinstance(stmt, ast.With):
            head = [item.context_expr for item in stmt.items]
            for item in stmt.items:
                if item.optional_vars is not None:
                    assigned |= targets(item.optional_vars)[0]
        read = set().union(*(loads(h) for h in head)) if head else set()
        for part in _parts(stmt):
            a, r = sequence(part, assigned)
            assigned |= a
            read |= r
        return assigned, read
    assigned = set()
    read = set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                read.add(node.id)
            else:
                assigned.add(node.id)
        elif isinstance(node, ast.AugAssign | ast.Assign | ast.AnnAssign):
            stores = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in stores:
                a, r = targets(t)
                assigned |= a
                read |= r
                if isinstance(node, ast.AugAssign):
                    read |= a
    return assigned, read


def _parts(stmt: ast.stmt) -> list[list[ast.stmt]]:
    parts = [getattr(stmt, "body", []), getattr(stmt, "orelse", [])]
    if isinstance(stmt, ast.Try):
        parts += [h.body for h in stmt.handlers] + [stmt.finalbody]
    return parts


def sequence(stmts: list[ast.stmt], known: set[str]) -> tuple[set[str], set[str]]:
    """``(assigned, read before assigned)`` of a statement list, given names ``known`` set."""
    assigned: set[str] = set()
    read: set[str] = set()
    certain = set(known)
    for s in stmts:
        a, r = effects(s)
        read |= r - certain
        assigned |= a
        certain |= full_assigns(s)
    return assigned, read


def escapes(stmt: ast.stmt) -> bool:
    """Whether a statement leaves the flow (return, break, yield...) or defines a scope."""
    kinds = (
        ast.Return,
        ast.Break,
        ast.Continue,
        ast.Yield,
        ast.YieldFrom,
        ast.Await,
        ast.Global,
        ast.Nonlocal,
        ast.FunctionDef,
        ast.ClassDef,
        ast.Raise,
    )
    return any(isinstance(n, kinds) for n in ast.walk(stmt))


def sure(stmts: list[ast.stmt]) -> set[str]:
    """Names a statement list surely replaces."""
    out: set[str] = set()
    for s in stmts:
        out |= full_assigns(s)
    return out


def full_assigns(stmt: ast.stmt) -> set[str]:
    """Names a statement surely replaces (plain assignments at its top level)."""
    if isinstance(stmt, ast.Assign):
        out: set[str] = set()
        for t in stmt.targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    out.add(n.id)
        for t in stmt.targets:
            out -= targets(t)[1]
        return out
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return {stmt.target.id}
    if isinstance(stmt, ast.If) and stmt.orelse:  # assigned on both ways
        return sure(stmt.body) & sure(stmt.orelse)
    return set()


def read_later(
    names: set[str], stmt: ast.stmt, expr: ast.expr, rest: list[list[ast.stmt]]
) -> set[str]:
    """Which of ``names`` are read after the branch, before being assigned again."""
    live = set(names)
    # the site statement itself, outside the branch expression
    inside = {id(m) for m in ast.walk(expr)}
    outside = {
        n.id
        for n in ast.walk(stmt)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in inside
    }
    found = live & outside
    live -= full_assigns(stmt)
    for stmts in rest:
        for s in stmts:
            if not live:
                return found
            found |= live & effects(s)[1]
            live -= full_assigns(s)
    return found


def read_after(names: set[str], rest: list[list[ast.stmt]]) -> bool:
    """Whether any of ``names`` is read in ``rest`` before being assigned again."""
    live = set(names)
    for stmts in rest:
        for s in stmts:
            if live & effects(s)[1]:
                return True
            live -= full_assigns(s)
            if not live:
                return False
    return False
