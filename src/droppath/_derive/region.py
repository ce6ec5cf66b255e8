"""The region of a site: which statements before it compute its branch and can move into it.

A branch extends backwards from the site over the statements that compute what it reads, since
the shortcut was taken, as long as moving them after the keep decision changes nothing the rest
of the forward reads (``plan_branch``). A value computed into a name and added to the
shortcut later is folded into the sum first (``fold``), and the statements that read a
tensor's sizes run again on the kept rows (``shape_statements``).
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

from droppath._derive.analysis import (
    effects,
    escapes,
    full_assigns,
    loads,
    read_after,
    read_later,
    sequence,
    sure,
)
from droppath._derive.forms import batch_name, has_site, is_shape, site_call, statement_term

__all__ = ["Plan", "Scope", "fold", "plan_branch", "shape_statements"]


@dataclass(frozen=True)
class Scope:
    """What the walk knows of the forward: its sites, its local names (its parameters and every
    name it assigns), and ``keep_shared``: a statement whose values the forward also reads after
    the site stays in place (computed for every sample), instead of moving and coming back beside
    the branch's output."""

    sites: frozenset[str]
    locals: frozenset[str]
    keep_shared: bool
    params: frozenset[str] = frozenset()
    body: tuple[ast.stmt, ...] = ()
    # the names of the batch size (``B = x.shape[0]``) when a branch may not reach past a
    # statement that regroups rows with it (``x.reshape(B * T, ...)``): the third rewrite, whose
    # branch takes its rows where the site's rows are made (Timesformer's per-frame sites)
    regroup: frozenset[str] = frozenset()

    @staticmethod
    def of(
        sites: Collection[str],
        params: list[str],
        body: list[ast.stmt],
        keep_shared: bool,
        regroup: bool = False,
    ) -> Scope:
        names = set(params)
        for stmt in body:
            names |= effects(stmt)[0]
        batch = frozenset(
            name
            for stmt in (body if regroup else ())
            for node in ast.walk(stmt)
            if isinstance(node, ast.Assign) and (name := batch_name(node)) is not None
        )
        return Scope(
            frozenset(sites), frozenset(names), keep_shared, frozenset(params), tuple(body), batch
        )

    def regroups(self, stmt: ast.stmt) -> bool:
        """Whether ``stmt`` reshapes a tensor into rows of a multiple of the batch size
        (``.reshape(B * T, ...)``, ``.view(B * H * W, ...)``): rows that are no more samples."""
        for node in ast.walk(stmt):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("reshape", "view")
                and node.args
                and isinstance(node.args[0], ast.BinOp)
                and loads(node.args[0]) & self.regroup
            ):
                return True
        return False

    def assigned_outside(self, region: list[ast.stmt]) -> set[str]:
        """The names that have a value before ``region`` may run: the parameters and what the
        forward's other statements assign (a statement that holds the region counts, so a region
        inside a loop or an ``if`` keeps every name it could find from before)."""
        names = set(self.params)
        for stmt in self.body:
            if not any(stmt is r for r in region):
                names |= effects(stmt)[0]
        return names


class Plan(NamedTuple):
    """A site's plan: the branch expression, the statements moved into the branch (in order),
    the names the branch reads from outside, and those it assigns that are read after it
    (returned beside its output)."""

    expr: ast.expr
    moved: list[ast.stmt]
    reads: set[str]
    live: list[str]


def fold(
    stmts: list[ast.stmt], after: list[list[ast.stmt]], sites: Collection[str]
) -> list[ast.stmt]:
    """``v = self.drop_path(e); ...; y = v + s`` (or ``v += s``, ``s + v``), where nothing
    between reads ``v`` and nothing after the sum does: the site moves to the sum,
    ``v = e; ...; y = self.drop_path(v) + s``, so that it runs as a residual sum."""
    out = list(stmts)
    for i, stmt in enumerate(out):
        if not (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and site_call(stmt.value, sites)
        ):
            continue
        v = stmt.targets[0].id
        call = stmt.value
        assert isinstance(call, ast.Call)
        j = next((k for k in range(i + 1, len(out)) if v in effects(out[k])[1]), None)
        if j is None:
            continue
        new = _sum_at(out[j], v, call)
        if new is None:
            continue
        if v not in full_assigns(new) and read_after({v}, [out[j + 1 :], *after]):
            continue
        out[i] = ast.fix_missing_locations(ast.Assign(targets=stmt.targets, value=call.args[0]))
        out[j] = ast.fix_missing_locations(new)
    return out


def _sum_at(target: ast.stmt, v: str, call: ast.Call) -> ast.stmt | None:
    """``target``, a sum of ``v`` and a shortcut that does not read it, with the site ``call``
    moved onto ``v``; None if ``target`` is no such sum."""
    if isinstance(target, ast.AugAssign) and isinstance(target.op, ast.Add):
        if not (isinstance(target.target, ast.Name) and target.target.id == v):
            return None
        if loads(target.value) & {v}:
            return None
        new_value: ast.expr = ast.BinOp(
            ast.Call(call.func, [ast.Name(v, ast.Load())], []), ast.Add(), target.value
        )
        return ast.Assign(targets=[target.target], value=new_value)
    if isinstance(target, ast.Assign | ast.Return) and isinstance(target.value, ast.BinOp):
        bop = target.value
        sides = [bop.left, bop.right]
        if not isinstance(bop.op, ast.Add) or not any(
            isinstance(x, ast.Name) and x.id == v for x in sides
        ):
            return None
        other = bop.right if isinstance(bop.left, ast.Name) and bop.left.id == v else (bop.left)
        if v in loads(other):
            return None
        dropped = ast.Call(call.func, [ast.Name(v, ast.Load())], [])
        left, right = (dropped, other) if other is bop.right else (other, dropped)
        value = ast.BinOp(left, ast.Add(), right)
        return (
            ast.Return(value)
            if isinstance(target, ast.Return)
            else ast.Assign(targets=target.targets, value=value)
        )
    return None


def plan_branch(
    before: list[ast.stmt], stmt: ast.stmt, rest: list[list[ast.stmt]], scope: Scope
) -> Plan | None:
    """For a statement with one site term: its branch expression, the statements to move into
    the branch (in order) and the names the branch reads from outside. None: no term."""
    term = statement_term(stmt, scope.sites)
    if term is None:
        return None
    _, expr, base = term
    base_reads = loads(base) if base is not None else set()
    needed = loads(expr) - {"self"}
    chosen: set[int] = set()
    skipped: list[int] = []
    for j in reversed(range(len(before))):
        assigned, reads = effects(before[j])
        if not (assigned & needed):
            skipped.append(j)
            continue
        if not _movable(before[j], base_reads, scope):
            break
        if scope.keep_shared and read_later(assigned, stmt, expr, rest):
            break
        # a statement left in place after this one must neither read what it assigns nor
        # change what it reads: it moves into the branch too, or the branch stops here
        absorbed = _absorb(before, j, skipped, base_reads, (stmt, expr, rest), scope)
        if absorbed is None:
            break
        chosen |= {j, *absorbed}
        skipped = [k for k in skipped if k not in absorbed]
        needed = (needed - full_assigns(before[j])) | (reads - {"self"})
        for k in absorbed:
            needed |= effects(before[k])[1] - {"self"}
    region = [before[j] for j in sorted(chosen)]
    inner = sequence(region, set())[1] | (loads(expr) - sure(region))
    needed = inner - {"self"}
    region_assigns = set().union(*(effects(s)[0] for s in region)) if region else set()
    # what the moved statements compute and the rest of the forward reads (attention
    # weights, say) the branch returns beside its output
    live = sorted(read_later(region_assigns, stmt, expr, rest)) if region_assigns else []
    # a name the region reads that only the region assigns (under an ``if`` in one statement,
    # read under the same condition in another) has no value before it: not an argument
    unbound = region_assigns - scope.assigned_outside(region)
    return Plan(expr, region, (needed & scope.locals) - unbound, live)


def _movable(stmt: ast.stmt, base_reads: set[str], scope: Scope) -> bool:
    assigned = effects(stmt)[0]
    return not (
        assigned & base_reads
        or escapes(stmt)
        or has_site(stmt, scope.sites)
        or scope.regroups(stmt)
    )


def _absorb(
    before: list[ast.stmt],
    j: int,
    skipped: list[int],
    base_reads: set[str],
    site: tuple[ast.stmt, ast.expr, list[list[ast.stmt]]],
    scope: Scope,
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
            a, r = effects(before[k])
            clash = any(
                (effects(before[m])[0] & r and m < k) or (effects(before[m])[1] & a and m < k)
                for m in moving
            )
            if clash:
                if not _movable(before[k], base_reads, scope):
                    return None
                if scope.keep_shared and read_later(a, *site):
                    return None
                # what it reads must not change between it and the site
                later = [before[i] for i in skipped if i > k and i not in moving]
                if any(effects(t)[0] & r for t in later):
                    return None
                moving.add(k)
                changed = True
    return moving - {j}


def shape_statements(
    before: list[ast.stmt], moved: list[ast.stmt], plan: Plan | None, scope: Scope
) -> list[tuple[ast.stmt, str | None]]:
    """Statements before the branch that read sizes off a tensor (``B, N, C = x.shape``)
    whose names the branch reads. Each runs again in the branch, on the kept rows, when what
    it reads has not changed since (``(stmt, None)``); otherwise only its batch size is taken
    again, from the branch's rows (``(stmt, name)``). A statement that regroups rows
    (``Scope.regroups``) makes the branch's rows: it stays before the branch."""
    if plan is None:
        return []
    needed = plan.reads
    out: list[tuple[ast.stmt, str | None]] = []
    outside = [s for s in before if not any(s is m for m in moved)]
    for j, s in enumerate(outside):
        if not (isinstance(s, ast.Assign) and is_shape(s.value)) or scope.regroups(s):
            continue
        assigned, reads = effects(s)
        if not assigned & needed:
            continue
        later = [*outside[j + 1 :], *moved]
        if not any(reads & effects(t)[0] for t in later):
            out.append((s, None))
            continue
        first = batch_name(s)
        if first is not None and first in needed:
            out.append((s, first))
    return out
