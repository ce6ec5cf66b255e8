"""The walk over a forward's statements that rewrites each use of a site.

A simple statement (an assignment, ``+=``, a ``return``, an expression) gets its site terms
replaced (``Terms``), with the statements of its branch's region
moved into the branch (``droppath._derive.region``); the bodies of ``if``, ``for``, ``while``
and ``with`` are walked in turn, and a branch that starts before an ``if`` (or two nested ones)
is hoisted into it.
A site called in any other statement raises ``DeriveError``.
"""

from __future__ import annotations

import ast

from droppath._derive.analysis import effects, loads
from droppath._derive.errors import DeriveError
from droppath._derive.forms import calls_in, site_term
from droppath._derive.region import Plan, Scope, fold, plan_branch, shape_statements
from droppath._derive.terms import Output, Terms

__all__ = ["Rewriter"]


class Rewriter:
    """Rewrites the statements of one forward; what it made is in ``output``."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.output = Output()

    def block(self, stmts: list[ast.stmt], after: list[list[ast.stmt]]) -> list[ast.stmt]:
        """A statement list, rewritten; ``after`` holds the statement lists that run after it."""
        sites = self.scope.sites
        out: list[ast.stmt] = []
        i = 0
        stmts = fold(list(stmts), after, sites)
        while i < len(stmts):
            stmt = stmts[i]
            rest = [stmts[i + 1 :], *after]
            if not calls_in(stmt, sites):
                out.append(stmt)
            elif isinstance(stmt, ast.If) and not calls_in(stmt.test, sites):
                hoisted = self._hoist(out, stmt, rest)
                if hoisted is None:
                    stmt.body = self.block(stmt.body, rest)
                    stmt.orelse = self.block(stmt.orelse, rest)
                    out.append(stmt)
                else:
                    out[:] = hoisted
            elif isinstance(stmt, ast.For | ast.While | ast.If):
                stmt.body = self.block(stmt.body, [[stmt], *rest])
                stmt.orelse = self.block(stmt.orelse, rest)
                out.append(stmt)
            elif isinstance(stmt, ast.With):
                stmt.body = self.block(stmt.body, rest)
                out.append(stmt)
            elif isinstance(stmt, ast.Assign | ast.AugAssign | ast.Return | ast.Expr):
                new, moved = self._simple(out, stmt, rest)
                out[:] = [s for s in out if not any(s is m for m in moved)]
                out.extend(new)
            else:
                raise DeriveError(
                    "rewrite", f"a site is called in a {type(stmt).__name__} statement"
                )
            i += 1
        return out

    def _hoist(
        self, before: list[ast.stmt], stmt: ast.If, rest: list[list[ast.stmt]]
    ) -> list[ast.stmt] | None:
        """``if c: ...; y = self.drop_path(x) + s`` whose branch starts before the ``if``: the
        statements before it move into the ``if`` (and, unchanged, into its ``else``)."""
        sites = self.scope.sites
        first, *others = stmt.body
        nested = isinstance(first, ast.If) and not calls_in(first.test, sites)
        if nested and len(calls_in(first, sites)) == 1:
            if not any(calls_in(s, sites) for s in others):
                return self._hoist_nested(before, stmt, rest)
        found = _one_site(stmt.body, sites)
        if found is None:
            return None
        q, site_stmt = found
        prefix = [*before, *stmt.body[:q]]
        after = [stmt.body[q + 1 :], *rest]
        hoist = self._hoistable(before, prefix, site_stmt, after, loads(stmt.test))
        if hoist is None:
            return None
        plan, moved_outer = hoist
        # the else branch runs the moved statements first, as before
        new, moved = self._simple(prefix, site_stmt, after, plan)
        body = [s for s in stmt.body[:q] if not any(s is m for m in moved)]
        new_if = ast.If(
            test=stmt.test,
            body=[*body, *new, *self.block(stmt.body[q + 1 :], rest)],
            orelse=[*moved_outer, *self.block(stmt.orelse, rest)],
        )
        kept = [s for s in before if not any(s is m for m in moved_outer)]
        return [*kept, new_if]

    def _hoist_nested(
        self, before: list[ast.stmt], outer: ast.If, rest: list[list[ast.stmt]]
    ) -> list[ast.stmt] | None:
        """``if a: if b: ...; y = self.drop_path(x)`` (timm RexNet: ``if self.use_shortcut:``,
        then ``if self.drop_path is not None:``) whose branch starts before the outer ``if``: the
        statements before it move into the inner ``if``, and, unchanged, into both ``else``."""
        sites = self.scope.sites
        inner = outer.body[0]
        assert isinstance(inner, ast.If)
        found = _one_site(inner.body, sites)
        if found is None:
            return None
        q, site_stmt = found
        prefix = [*before, *inner.body[:q]]
        after_inner = [outer.body[1:], *rest]
        after = [inner.body[q + 1 :], *after_inner]
        tests = loads(outer.test) | loads(inner.test)
        hoist = self._hoistable(before, prefix, site_stmt, after, tests)
        if hoist is None:
            return None
        plan, moved_outer = hoist
        new, moved = self._simple(prefix, site_stmt, after, plan)
        body = [s for s in inner.body[:q] if not any(s is m for m in moved)]
        new_inner = ast.If(
            test=inner.test,
            body=[*body, *new, *self.block(inner.body[q + 1 :], after_inner)],
            orelse=[*moved_outer, *self.block(inner.orelse, after_inner)],
        )
        new_outer = ast.If(
            test=outer.test,
            body=[new_inner, *self.block(outer.body[1:], rest)],
            orelse=[*moved_outer, *self.block(outer.orelse, rest)],
        )
        kept = [s for s in before if not any(s is m for m in moved_outer)]
        return [*kept, new_outer]

    def _hoistable(
        self,
        before: list[ast.stmt],
        prefix: list[ast.stmt],
        site_stmt: ast.stmt,
        after: list[list[ast.stmt]],
        tests: set[str],
    ) -> tuple[Plan, list[ast.stmt]] | None:
        """The plan of a site statement under an ``if`` and the statements of ``before`` it moves
        into the branch; None if it moves none, or one that the ``if`` tests (``tests``) read."""
        plan = plan_branch(prefix, site_stmt, after, self.scope)
        if plan is None:
            return None
        moved_outer = [s for s in plan.moved if any(s is b for b in before)]
        if not moved_outer:
            return None
        assigned = set().union(*(effects(s)[0] for s in moved_outer))
        if assigned & tests:
            return None
        return plan, moved_outer

    def _simple(
        self,
        before: list[ast.stmt],
        stmt: ast.stmt,
        rest: list[list[ast.stmt]],
        plan: Plan | None = None,
    ) -> tuple[list[ast.stmt], list[ast.stmt]]:
        """A simple statement with its site terms rewritten (after the binding of what its branch
        returns beside its output, if anything), and the statements moved."""
        sites = self.scope.sites
        calls = calls_in(stmt, sites)
        moved: list[ast.stmt] = []
        if len(calls) == 1:
            plan = plan or plan_branch(before, stmt, rest, self.scope)
            if plan is not None:
                moved = plan.moved
        shapes = shape_statements(before, moved, plan, self.scope)
        transformer = Terms(self.scope, self.output, plan, shapes)
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
            term = site_term(stmt.value, sites)
            if term is not None:
                load = _as_load(stmt.target)
                call = transformer.emit(term[0], term[1], load, branch_first=True)
                if call is None:
                    return [stmt], moved
                new: ast.stmt = ast.Assign(targets=[stmt.target], value=call)
                return [*transformer.pre, ast.fix_missing_locations(new)], moved
        new = transformer.visit(stmt)
        if transformer.count != len(calls):
            raise DeriveError("rewrite", "a site call nested in another site's branch")
        return [*transformer.pre, new], moved


def _one_site(body: list[ast.stmt], sites: frozenset[str]) -> tuple[int, ast.stmt] | None:
    """The index and statement of ``body``'s one site call, if it is a simple statement that
    holds no other."""
    top = [s for s in body if calls_in(s, sites)]
    if len(top) != 1 or len(calls_in(top[0], sites)) != 1:
        return None
    if not isinstance(top[0], ast.Assign | ast.AugAssign | ast.Return):
        return None
    return body.index(top[0]), top[0]


def _as_load(target: ast.expr) -> ast.expr:
    """A store target, read: ``x`` of ``x += ...`` as the shortcut of the sum."""
    node = ast.parse(ast.unparse(target), mode="eval").body
    return node
