"""Derive, from a block class's installed source, a training forward that skips dropped work.

:func:`derive` reads the class's ``forward`` (``inspect`` + ``ast``) and writes a new one in which
every call of a drop-path site, ``self.<site>(...)``, runs its branch on the kept samples only:

- **a residual sum**: ``a + self.drop_path(g(x))`` (either order, ``+=``, in a ``return``, the
  shortcut any expression) becomes ``add(self, "drop_path", a, branch, args)``, which runs
  ``branch`` on the kept rows and adds them into ``a`` (``droppath._derived_ops``);
- **a row-wise module after the site**, ``a + self.ls(self.drop_path(g(x)))``, is part of the
  branch (it runs on the kept rows only);
- **the branch**: the expression inside the call, extended backwards over the statements that
  compute it since the shortcut was taken (``shortcut = x; x = f(x); ...; x = self.drop_path(x) +
  shortcut``), statements under an ``if`` included, as long as moving them changes nothing the
  rest of the forward reads. The statements become a function of their own, whose arguments (the
  block, the input, side inputs) are gathered at the kept rows when they hold one row per sample;
- **any other use** of a site (its output concatenated, returned, ...) becomes ``rows(...)``: the
  branch runs on the kept rows, and the dropped rows are zeros.

Nothing here is trusted: ``droppath._verify`` runs the result against the class's own forward
under the same keep decisions before a block uses it. A forward this module cannot read or rewrite
raises :class:`DeriveError`, which says which step failed and why, in one line.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from droppath import _derived_ops
from droppath.residual import _host_side

__all__ = ["NOTHING_TO_SKIP", "DeriveError", "Derived", "derive"]

# Names the generated code binds (closure cells of the factory), out of any library's way.
_ADD, _ROWS, _CLS = "__droppath_add", "__droppath_rows", "__droppath_cls"


NOTHING_TO_SKIP = "the branch's work is done before the site and read after it: nothing to skip"


class DeriveError(Exception):
    """A forward that cannot be derived: ``step`` (``"parse"`` or ``"rewrite"``) and why."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step, self.reason = step, reason


@dataclass(frozen=True)
class Derived:
    """A derived training forward: ``forward(block, *args, **kwargs)``, the sites it rewrote, and
    its source code (for reading; the function is compiled from the syntax tree)."""

    forward: Callable[..., Any]
    sites: tuple[str, ...]
    source: str


# --- reading names -----------------------------------------------------------------------------


def _targets(node: ast.AST) -> tuple[set[str], set[str]]:
    """Names a store target assigns, and names it reads (``x[i] = ...`` reads and changes x)."""
    if isinstance(node, ast.Name):
        return {node.id}, set()
    if isinstance(node, ast.Tuple | ast.List):
        out: tuple[set[str], set[str]] = (set(), set())
        for elt in node.elts:
            a, r = _targets(elt)
            out[0].update(a)
            out[1].update(r)
        return out
    if isinstance(node, ast.Starred):
        return _targets(node.value)
    if isinstance(node, ast.Subscript | ast.Attribute):
        reads = _loads(node)
        root = node.value
        while isinstance(root, ast.Subscript | ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name):
            return {root.id}, reads | {root.id}
        return set(), reads
    return set(), _loads(node)


def _loads(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _effects(stmt: ast.stmt) -> tuple[set[str], set[str]]:
    """``(assigned, read)`` names of a statement. A compound statement reads what its parts
    read before they assign it (``if c: h = f(x); y = g(h)`` reads c, x, not h)."""
    if isinstance(stmt, ast.If | ast.For | ast.While | ast.With | ast.Try):
        head: list[ast.AST] = []
        assigned: set[str] = set()
        if isinstance(stmt, ast.If | ast.While):
            head = [stmt.test]
        elif isinstance(stmt, ast.For):
            head = [stmt.iter]
            assigned |= _targets(stmt.target)[0]
        elif isinstance(stmt, ast.With):
            head = [item.context_expr for item in stmt.items]
            for item in stmt.items:
                if item.optional_vars is not None:
                    assigned |= _targets(item.optional_vars)[0]
        read = set().union(*(_loads(h) for h in head)) if head else set()
        for part in _parts(stmt):
            a, r = _sequence(part, assigned)
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
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                a, r = _targets(t)
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


def _sequence(stmts: list[ast.stmt], known: set[str]) -> tuple[set[str], set[str]]:
    """``(assigned, read before assigned)`` of a statement list, given names ``known`` set."""
    assigned: set[str] = set()
    read: set[str] = set()
    sure = set(known)
    for s in stmts:
        a, r = _effects(s)
        read |= r - sure
        assigned |= a
        sure |= _full_assigns(s)
    return assigned, read


def _escapes(stmt: ast.stmt) -> bool:
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


# --- the sites of a statement ------------------------------------------------------------------


def _site_call(node: ast.AST, sites: Collection[str]) -> str | None:
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


def _site_term(node: ast.AST, sites: Collection[str]) -> tuple[str, ast.expr] | None:
    """``(site, branch expression)`` for ``self.<site>(e)`` and ``self.<m>(self.<site>(e))``
    (a row-wise module after the site, part of the branch); None otherwise."""
    site = _site_call(node, sites)
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
        inner = _site_call(node.args[0], sites)
        if inner is not None:
            call = node.args[0]
            assert isinstance(call, ast.Call)
            post = ast.Call(func=node.func, args=[call.args[0]], keywords=[])
            return inner, post
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        # a layer scale: ``self.gamma * self.drop_path(e)`` (either order)
        for this, other in ((node.right, node.left), (node.left, node.right)):
            inner = _site_call(this, sites)
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


def _has_site(stmt: ast.stmt, sites: Collection[str]) -> bool:
    """Whether a statement calls a site, or an op a site was rewritten into."""
    return bool(_calls_in(stmt, sites)) or any(
        isinstance(n, ast.Name) and n.id.startswith("__droppath_") for n in ast.walk(stmt)
    )


def _calls_in(node: ast.AST, sites: Collection[str]) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and _site_call(n, sites)]


# --- the rewrite ---------------------------------------------------------------------------------

# A site's plan: the branch expression, the statements moved into the branch, the names the branch
# reads from outside, and those it assigns that are read after it (returned beside its output).
_Plan = tuple[ast.expr, list[ast.stmt], set[str], list[str]]


@dataclass
class _Branch:
    """A branch to be emitted as a function: its parameters, statements and returned value."""

    name: str
    params: list[str]
    body: list[ast.stmt]
    value: ast.expr


class _Rewriter:
    def __init__(
        self,
        sites: Collection[str],
        params: Sequence[str],
        body: list[ast.stmt],
        keep_shared: bool = False,
    ):
        self.sites = set(sites)
        # keep_shared: a statement whose values the forward also reads after the site stays in
        # place (computed for every sample), instead of moving and coming back beside the output
        self.keep_shared = keep_shared
        self.branches: list[_Branch] = []
        self.rewritten: set[str] = set()  # sites whose work is skipped
        self.kept: set[str] = set()  # sites left as they are: their work cannot move
        self.used: set[str] = set()
        # the forward's local names: its parameters and everything it assigns
        self.locals = set(params)
        for stmt in body:
            self.locals |= _effects(stmt)[0]
        self.params = list(params)

    # A statement list, rewritten; ``after`` holds the statement lists that run after it.
    def block(self, stmts: list[ast.stmt], after: list[list[ast.stmt]]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        i = 0
        stmts = self._fold(list(stmts), after)
        while i < len(stmts):
            stmt = stmts[i]
            rest = [stmts[i + 1 :], *after]
            if not _calls_in(stmt, self.sites):
                out.append(stmt)
            elif isinstance(stmt, ast.If) and not _calls_in(stmt.test, self.sites):
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

    def _fold(self, stmts: list[ast.stmt], after: list[list[ast.stmt]]) -> list[ast.stmt]:
        """``v = self.drop_path(e); ...; y = v + s`` (or ``v += s``, ``s + v``), where nothing
        between reads ``v`` and nothing after the sum does: the site moves to the sum,
        ``v = e; ...; y = self.drop_path(v) + s``, so that it runs as a residual sum."""
        out = list(stmts)
        for i, stmt in enumerate(out):
            if not (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
                and _site_call(stmt.value, self.sites)
            ):
                continue
            v = stmt.targets[0].id
            call = stmt.value
            assert isinstance(call, ast.Call)
            j = next((k for k in range(i + 1, len(out)) if v in _effects(out[k])[1]), None)
            if j is None:
                continue
            target = out[j]
            rest = [out[j + 1 :], *after]
            if isinstance(target, ast.AugAssign) and isinstance(target.op, ast.Add):
                if not (isinstance(target.target, ast.Name) and target.target.id == v):
                    continue
                if _loads(target.value) & {v}:
                    continue
                new_value: ast.expr = ast.BinOp(
                    ast.Call(call.func, [ast.Name(v, ast.Load())], []), ast.Add(), target.value
                )
                new: ast.stmt = ast.Assign(targets=[target.target], value=new_value)
            elif isinstance(target, ast.Assign | ast.Return) and isinstance(
                target.value, ast.BinOp
            ):
                bop = target.value
                sides = [bop.left, bop.right]
                if not isinstance(bop.op, ast.Add) or not any(
                    isinstance(x, ast.Name) and x.id == v for x in sides
                ):
                    continue
                other = (
                    bop.right if isinstance(bop.left, ast.Name) and bop.left.id == v else (bop.left)
                )
                if v in _loads(other):
                    continue
                dropped = ast.Call(call.func, [ast.Name(v, ast.Load())], [])
                left, right = (dropped, other) if other is bop.right else (other, dropped)
                value = ast.BinOp(left, ast.Add(), right)
                new = (
                    ast.Return(value)
                    if isinstance(target, ast.Return)
                    else ast.Assign(targets=target.targets, value=value)
                )
            else:
                continue
            if v not in _full_assigns(new) and _read_after({v}, rest):
                continue
            out[i] = ast.fix_missing_locations(ast.Assign(targets=stmt.targets, value=call.args[0]))
            out[j] = ast.fix_missing_locations(new)
        return out

    def _hoist(
        self, before: list[ast.stmt], stmt: ast.If, rest: list[list[ast.stmt]]
    ) -> list[ast.stmt] | None:
        """``if c: ...; y = self.drop_path(x) + s`` whose branch starts before the ``if``: the
        statements before it move into the ``if`` (and, unchanged, into its ``else``)."""
        top = [s for s in stmt.body if _calls_in(s, self.sites)]
        if len(top) != 1 or len(_calls_in(top[0], self.sites)) != 1:
            return None
        site_stmt = top[0]
        if not isinstance(site_stmt, ast.Assign | ast.AugAssign | ast.Return):
            return None
        q = stmt.body.index(site_stmt)
        prefix = [*before, *stmt.body[:q]]
        plan = self._plan(prefix, site_stmt, [stmt.body[q + 1 :], *rest])
        if plan is None:
            return None
        moved_outer = [s for s in plan[1] if any(s is b for b in before)]
        if not moved_outer:
            return None
        assigned = set().union(*(_effects(s)[0] for s in moved_outer))
        if assigned & _loads(stmt.test):
            return None
        if any(assigned & _effects(s)[1] for s in stmt.orelse):
            pass  # the else branch runs the moved statements first, as before
        new, moved = self._simple(prefix, site_stmt, [stmt.body[q + 1 :], *rest], plan)
        body = [s for s in stmt.body[:q] if not any(s is m for m in moved)]
        new_if = ast.If(
            test=stmt.test,
            body=[*body, *new, *self.block(stmt.body[q + 1 :], rest)],
            orelse=[*moved_outer, *self.block(stmt.orelse, rest)],
        )
        kept = [s for s in before if not any(s is m for m in moved_outer)]
        return [*kept, new_if]

    def _plan(
        self,
        before: list[ast.stmt],
        stmt: ast.stmt,
        rest: list[list[ast.stmt]],
    ) -> _Plan | None:
        """For a statement with one site term: its base reads, the statements to move into the
        branch (in order) and the names the branch reads from outside. None: no term."""
        term = self._term(stmt)
        if term is None:
            return None
        _, expr, base = term
        base_reads = _loads(base) if base is not None else set()
        needed = _loads(expr) - {"self"}
        chosen: set[int] = set()
        skipped: list[int] = []
        for j in reversed(range(len(before))):
            assigned, reads = _effects(before[j])
            if not (assigned & needed):
                skipped.append(j)
                continue
            if not self._movable(before[j], base_reads):
                break
            if self.keep_shared and _read_later(assigned, stmt, expr, rest):
                break
            # a statement left in place after this one must neither read what it assigns nor
            # change what it reads: it moves into the branch too, or the branch stops here
            absorbed = self._absorb(before, j, skipped, base_reads, (stmt, expr, rest))
            if absorbed is None:
                break
            chosen |= {j, *absorbed}
            skipped = [k for k in skipped if k not in absorbed]
            needed = (needed - _full_assigns(before[j])) | (reads - {"self"})
            for k in absorbed:
                needed |= _effects(before[k])[1] - {"self"}
        region = [before[j] for j in sorted(chosen)]
        inner = _sequence(region, set())[1] | (_loads(expr) - _sure(region))
        needed = inner - {"self"}
        region_assigns = set().union(*(_effects(s)[0] for s in region)) if region else set()
        # what the moved statements compute and the rest of the forward reads (attention
        # weights, say) the branch returns beside its output
        live = sorted(_read_later(region_assigns, stmt, expr, rest)) if region_assigns else []
        return expr, region, needed & self.locals, live

    def _movable(self, stmt: ast.stmt, base_reads: set[str]) -> bool:
        assigned = _effects(stmt)[0]
        return not (assigned & base_reads or _escapes(stmt) or _has_site(stmt, self.sites))

    def _absorb(
        self,
        before: list[ast.stmt],
        j: int,
        skipped: list[int],
        base_reads: set[str],
        site: tuple[ast.stmt, ast.expr, list[list[ast.stmt]]],
    ) -> set[int] | None:
        """The statements left in place after ``before[j]`` that must move with it into the
        branch (they read what it assigns, or change what it reads), transitively; None if one
        of them cannot move."""
        moving = {j}
        changed = True
        while changed:
            changed = False
            for k in skipped:
                if k in moving:
                    continue
                a, r = _effects(before[k])
                clash = any(
                    (_effects(before[m])[0] & r and m < k) or (_effects(before[m])[1] & a and m < k)
                    for m in moving
                )
                if clash:
                    if not self._movable(before[k], base_reads):
                        return None
                    if self.keep_shared and _read_later(a, *site):
                        return None
                    # what it reads must not change between it and the site
                    later = [before[i] for i in skipped if i > k and i not in moving]
                    if any(_effects(t)[0] & r for t in later):
                        return None
                    moving.add(k)
                    changed = True
        return moving - {j}

    def _term(self, stmt: ast.stmt) -> tuple[str, ast.expr, ast.expr | None] | None:
        """The one site term of a simple statement: ``(site, branch expression, base)``; base
        None when the site is not added to a shortcut."""
        calls = _calls_in(stmt, self.sites)
        if len(calls) != 1:
            return None
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
            term = _site_term(stmt.value, self.sites)
            if term is not None:
                return term[0], term[1], stmt.target
        for node in ast.walk(stmt):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
                for side, other in ((node.right, node.left), (node.left, node.right)):
                    term = _site_term(side, self.sites)
                    if term is not None:
                        return term[0], term[1], other
        call = calls[0]
        return str(_site_call(call, self.sites)), call.args[0], None

    def _simple(
        self,
        before: list[ast.stmt],
        stmt: ast.stmt,
        rest: list[list[ast.stmt]],
        plan: _Plan | None = None,
    ) -> tuple[list[ast.stmt], list[ast.stmt]]:
        """A simple statement with its site terms rewritten (after the binding of what its branch
        returns beside its output, if anything), and the statements moved."""
        calls = _calls_in(stmt, self.sites)
        moved: list[ast.stmt] = []
        if len(calls) == 1:
            plan = plan or self._plan(before, stmt, rest)
            if plan is not None:
                moved = plan[1]
        shapes = self._shape_statements(before, moved, plan)
        transformer = _Terms(self, moved if plan else [], plan, shapes)
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
            term = _site_term(stmt.value, self.sites)
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

    def _shape_statements(
        self,
        before: list[ast.stmt],
        moved: list[ast.stmt],
        plan: _Plan | None,
    ) -> list[tuple[ast.stmt, str | None]]:
        """Statements before the branch that read sizes off a tensor (``B, N, C = x.shape``)
        whose names the branch reads. Each runs again in the branch, on the kept rows, when what
        it reads has not changed since (``(stmt, None)``); otherwise only its batch size is taken
        again, from the branch's rows (``(stmt, name)``)."""
        if plan is None:
            return []
        needed = plan[2]
        out: list[tuple[ast.stmt, str | None]] = []
        outside = [s for s in before if not any(s is m for m in moved)]
        for j, s in enumerate(outside):
            if not (isinstance(s, ast.Assign) and _is_shape(s.value)):
                continue
            assigned, reads = _effects(s)
            if not assigned & needed:
                continue
            later = [*outside[j + 1 :], *moved]
            if not any(reads & _effects(t)[0] for t in later):
                out.append((s, None))
                continue
            first = _batch_name(s)
            if first is not None and first in needed:
                out.append((s, first))
        return out


def _batch_name(stmt: ast.Assign) -> str | None:
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


def _is_shape(value: ast.expr) -> bool:
    for n in ast.walk(value):
        if isinstance(n, ast.Attribute) and n.attr == "shape":
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "size":
            return True
    return False


def _sure(stmts: list[ast.stmt]) -> set[str]:
    out: set[str] = set()
    for s in stmts:
        out |= _full_assigns(s)
    return out


def _full_assigns(stmt: ast.stmt) -> set[str]:
    """Names a statement surely replaces (plain assignments at its top level)."""
    if isinstance(stmt, ast.Assign):
        out: set[str] = set()
        for t in stmt.targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    out.add(n.id)
        for t in stmt.targets:
            out -= _targets(t)[1]
        return out
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return {stmt.target.id}
    if isinstance(stmt, ast.If) and stmt.orelse:  # assigned on both ways
        return _sure(stmt.body) & _sure(stmt.orelse)
    return set()


def _read_later(
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
    live -= _full_assigns(stmt)
    for stmts in rest:
        for s in stmts:
            if not live:
                return found
            found |= live & _effects(s)[1]
            live -= _full_assigns(s)
    return found


def _read_after(names: set[str], rest: list[list[ast.stmt]]) -> bool:
    """Whether any of ``names`` is read in ``rest`` before being assigned again."""
    live = set(names)
    for stmts in rest:
        for s in stmts:
            if live & _effects(s)[1]:
                return True
            live -= _full_assigns(s)
            if not live:
                return False
    return False


def _as_load(target: ast.expr) -> ast.expr:
    node = ast.parse(ast.unparse(target), mode="eval").body
    return node


class _Terms(ast.NodeTransformer):
    """Replaces the site terms of one statement by calls of the run-time ops."""

    def __init__(
        self,
        rewriter: _Rewriter,
        moved: list[ast.stmt],
        plan: _Plan | None,
        shapes: list[tuple[ast.stmt, str | None]],
    ) -> None:
        self.rewriter, self.moved, self.plan, self.shapes = rewriter, moved, plan, shapes
        self.count = 0
        self.pre: list[ast.stmt] = []  # binds what a branch returns beside its output

    def emit(
        self, site: str, expr: ast.expr, base: ast.expr | None, branch_first: bool = False
    ) -> ast.expr | None:
        """The op call for a site term, or None when rewriting it would skip no work."""
        r = self.rewriter
        name = f"__droppath_branch_{len(r.branches)}"
        shapes: list[tuple[ast.stmt, str | None]] = []
        if self.plan is not None and self.count == 0:
            body, params = list(self.moved), sorted(self.plan[2] - {"self"})
            shapes = self.shapes
            for s, batch in shapes:
                if batch is None:
                    params = sorted(set(params) | (_effects(s)[1] & r.locals) - {"self"})
                else:
                    params = [p for p in params if p != batch]
        else:
            body, params = [], sorted((_loads(expr) & r.locals) - {"self"})
        # the base, then the arguments named in the branch expression: where the rows come from
        first = [n.id for n in ast.walk(expr) if isinstance(n, ast.Name) and n.id in params]
        if isinstance(base, ast.Name) and base.id in params:
            first.insert(0, base.id)
        params = list(dict.fromkeys([*first, *params]))
        prologue: list[ast.stmt] = []
        for s, batch in shapes:
            if batch is None:
                prologue.append(s)
            elif params:
                prologue.append(ast.parse(f"{batch} = {params[0]}.shape[0]").body[0])
            else:
                raise DeriveError("rewrite", f"the branch reads the batch size {batch}")
        body = [*prologue, *body]
        self.count += 1
        if not body and isinstance(expr, ast.Name):
            # the branch's work is done before the site and cannot move after the decision: the
            # site stays as it is (the mask), and the report says so
            r.kept.add(site)
            return None
        live = self.plan[3] if self.plan is not None and self.count == 1 else []
        # a value returned beside the output that the branch may leave unassigned (under an
        # ``if``) comes in with its value from before
        unsure = [n for n in live if n not in _sure(body) and n in r.locals and n not in params]
        params = [*params, *unsure]
        value = (
            expr
            if not live
            else ast.Tuple([expr, *(ast.Name(n, ast.Load()) for n in live)], ast.Load())
        )
        r.branches.append(_Branch(name, ["self", *params], body, value))
        r.rewritten.add(site)
        args = ast.Tuple(elts=[ast.Name(p, ast.Load()) for p in params], ctx=ast.Load())
        self_ = ast.Name("self", ast.Load())
        fn = ast.Name(name, ast.Load())
        site_name = ast.Constant(site)
        if base is None:
            call = ast.Call(ast.Name(_ROWS, ast.Load()), [self_, site_name, fn, args], [])
        else:
            call = ast.Call(
                ast.Name(_ADD, ast.Load()),
                [self_, site_name, base, fn, args, ast.Constant(branch_first)],
                [],
            )
        if not live:
            return call
        call.keywords = [ast.keyword("sides", ast.Constant(len(live)))]
        out = f"__droppath_out_{len(r.branches) - 1}"
        names: list[ast.expr] = [ast.Name(n, ast.Store()) for n in (out, *live)]
        self.pre.append(ast.Assign(targets=[ast.Tuple(names, ast.Store())], value=call))
        return ast.Name(out, ast.Load())

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        if isinstance(node.op, ast.Add):
            sites = self.rewriter.sites
            right, left = _site_term(node.right, sites), _site_term(node.left, sites)
            if right is not None and not _calls_in(node.left, sites):
                call = self.emit(right[0], right[1], self.visit(node.left), False)
                return node if call is None else call
            if left is not None and not _calls_in(node.right, sites):
                call = self.emit(left[0], left[1], self.visit(node.right), True)
                return node if call is None else call
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        site = _site_call(node, self.rewriter.sites)
        if site is not None:
            if _calls_in(node.args[0], self.rewriter.sites):
                raise DeriveError("rewrite", "a site call nested in another site's branch")
            call = self.emit(site, node.args[0], None)
            return node if call is None else call
        return self.generic_visit(node)


class _Super(ast.NodeTransformer):
    """``super()`` becomes ``super(<the class>, self)``: the code runs outside the class."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not node.args:
            node.args = [ast.Name(_CLS, ast.Load()), ast.Name("self", ast.Load())]
        return node


def _forward_of(cls: type) -> types.FunctionType:
    for klass in cls.__mro__:
        fn = klass.__dict__.get("forward")
        if fn is not None:
            # a wrapper that keeps the function (transformers' checkpointing layers): its code
            fn = inspect.unwrap(fn)
            if not isinstance(fn, types.FunctionType):
                raise DeriveError("parse", f"{cls.__qualname__}.forward is not a Python function")
            return fn
    raise DeriveError("parse", f"{cls.__qualname__} has no forward")


def _strip(args: ast.arguments) -> None:
    """No annotations, and placeholder defaults (the function gets the original's values)."""
    for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
        if a is not None:
            a.annotation = None
    args.defaults = [ast.Constant(None) for _ in args.defaults]
    args.kw_defaults = [None if d is None else ast.Constant(None) for d in args.kw_defaults]


def derive(cls: type, sites: Collection[str], *, keep_shared: bool = False) -> Derived:
    """The training forward of ``cls`` with the work of dropped samples at ``sites`` skipped.

    ``keep_shared``: statements whose values the rest of the forward reads stay out of the
    branches (a second, more conservative rewrite, tried when the first fails its check).

    Raises:
        DeriveError: the source cannot be read (``parse``) or a site's use cannot be rewritten
            (``rewrite``).
    """
    fn = _forward_of(cls)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError) as error:
        raise DeriveError("parse", f"no source for {cls.__qualname__}.forward ({error})") from None
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise DeriveError("parse", f"{cls.__qualname__}.forward is not a plain function")
    if fn.__code__.co_freevars and set(fn.__code__.co_freevars) != {"__class__"}:
        raise DeriveError("parse", f"{cls.__qualname__}.forward closes over local names")
    a = fdef.args
    params = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    params += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    body = fdef.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    rewriter = _Rewriter(sites, params, body, keep_shared)
    try:
        new_body = rewriter.block(body, [])
    except DeriveError:
        raise
    except Exception as error:  # a form this rewriter does not foresee: never the user's error
        raise DeriveError("rewrite", f"{type(error).__name__}: {error}") from None
    if not rewriter.branches:
        if rewriter.kept:
            raise DeriveError("rewrite", f"{cls.__qualname__}: {NOTHING_TO_SKIP}")
        raise DeriveError("rewrite", f"{cls.__qualname__}.forward calls no site directly")
    fdef.body = new_body
    fdef.decorator_list = []
    fdef.returns = None
    _strip(fdef.args)
    fdef.name = "forward"
    funcs: list[ast.stmt] = []
    for br in rewriter.branches:
        fargs = ast.arguments(
            posonlyargs=[],
            args=[ast.arg(p) for p in br.params],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        )
        funcs.append(
            ast.FunctionDef(
                name=br.name,
                args=fargs,
                body=[*br.body, ast.Return(br.value)],
                decorator_list=[],
                returns=None,
            )
        )
    factory = ast.FunctionDef(
        name="__droppath_factory",
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(_ADD), ast.arg(_ROWS), ast.arg(_CLS)],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        body=[*funcs, fdef, ast.Return(ast.Name("forward", ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    module = ast.Module(body=[_Super().visit(factory)], type_ignores=[])
    ast.fix_missing_locations(module)
    text = ast.unparse(module)
    filename = f"<droppath derived {cls.__module__}.{cls.__qualname__}.forward>"
    try:
        code = compile(module, filename, "exec")
    except (SyntaxError, ValueError, TypeError) as error:
        raise DeriveError("rewrite", f"the generated code does not compile ({error})") from None
    factory_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    make = types.FunctionType(factory_code, fn.__globals__)
    # its own code runs on the host under torch.compile, as drop_add_residual's step does: the
    # branches and modules it calls compile as graphs of their own (residual._host_side)
    forward = make(_derived_ops.add, _derived_ops.rows, cls)
    forward.__defaults__ = fn.__defaults__
    forward.__kwdefaults__ = fn.__kwdefaults__
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    sites_done = tuple(sorted(rewriter.rewritten - rewriter.kept))
    return Derived(_host_side(forward), sites_done, text)
