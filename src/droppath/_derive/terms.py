"""The site terms of a statement, replaced by calls of the run-time ops.

A residual sum ``a + self.drop_path(g(x))`` becomes ``add(self, "drop_path", a, branch, args)``;
any other use of a site becomes ``rows(self, "drop_path", branch, args)``
(``droppath._derive.ops``). Each branch is recorded as a function of its own (``Branch``):
its parameters (the block, the input, side inputs), the statements moved into it, and what it
returns (its output, and beside it the values the rest of the forward reads).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from droppath._derive.analysis import effects, loads, sure
from droppath._derive.errors import DeriveError
from droppath._derive.forms import calls_in, site_call, site_term
from droppath._derive.region import Plan, Scope

__all__ = ["ADD", "RADD", "ROWS", "Branch", "Output", "Terms"]

# Names the generated code binds (closure cells of the factory), out of any library's way.
ADD, RADD, ROWS = "__droppath_add", "__droppath_radd", "__droppath_rows"


@dataclass
class Branch:
    """A branch to be emitted as a function: its parameters, statements and returned value."""

    name: str
    params: list[str]
    body: list[ast.stmt]
    value: ast.expr


@dataclass
class Output:
    """What the rewrite of a forward has made so far: its branches, the sites whose work is
    skipped, and those left as they are (their work cannot move)."""

    branches: list[Branch] = field(default_factory=list)
    rewritten: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)


class Terms(ast.NodeTransformer):
    """Replaces the site terms of one statement by calls of the run-time ops. The first term
    takes the statements of ``plan`` into its branch, with the ``shapes`` statements run again
    on the kept rows (``shape_statements``)."""

    def __init__(
        self,
        scope: Scope,
        output: Output,
        plan: Plan | None,
        shapes: list[tuple[ast.stmt, str | None]],
    ) -> None:
        self.scope, self.output, self.plan, self.shapes = scope, output, plan, shapes
        self.count = 0
        self.pre: list[ast.stmt] = []  # binds what a branch returns beside its output

    def emit(
        self, site: str, expr: ast.expr, base: ast.expr | None, branch_first: bool = False
    ) -> ast.expr | None:
        """The op call for a site term, or None when rewriting it would skip no work."""
        out = self.output
        name = f"__droppath_branch_{len(out.branches)}"
        body, params = self._branch(expr, base)
        self.count += 1
        if not body and isinstance(expr, ast.Name):
            # the branch's work is done before the site and cannot move after the decision: the
            # site stays as it is (the mask), and the report says so
            out.kept.add(site)
            return None
        live = self.plan.live if self.plan is not None and self.count == 1 else []
        # a value returned beside the output that the branch may leave unassigned (under an
        # ``if``) comes in with its value from before
        local = self.scope.locals
        unsure = [n for n in live if n not in sure(body) and n in local and n not in params]
        params = [*params, *unsure]
        value = (
            expr
            if not live
            else ast.Tuple([expr, *(ast.Name(n, ast.Load()) for n in live)], ast.Load())
        )
        out.branches.append(Branch(name, ["self", *params], body, value))
        out.rewritten.add(site)
        call = _op_call(site, base, name, params, branch_first)
        if not live:
            return call
        call.keywords = [ast.keyword("sides", ast.Constant(len(live)))]
        result = f"__droppath_out_{len(out.branches) - 1}"
        names: list[ast.expr] = [ast.Name(n, ast.Store()) for n in (result, *live)]
        self.pre.append(ast.Assign(targets=[ast.Tuple(names, ast.Store())], value=call))
        return ast.Name(result, ast.Load())

    def _branch(self, expr: ast.expr, base: ast.expr | None) -> tuple[list[ast.stmt], list[str]]:
        """The statements and the parameters (besides the block) of a site term's branch."""
        local = self.scope.locals
        shapes: list[tuple[ast.stmt, str | None]] = []
        if self.plan is not None and self.count == 0:
            body, params = list(self.plan.moved), sorted(self.plan.reads - {"self"})
            shapes = self.shapes
            for s, batch in shapes:
                if batch is None:
                    params = sorted(set(params) | (effects(s)[1] & local) - {"self"})
                else:
                    params = [p for p in params if p != batch]
        else:
            body, params = [], sorted((loads(expr) & local) - {"self"})
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
        return [*prologue, *body], params

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        if isinstance(node.op, ast.Add):
            sites = self.scope.sites
            right, left = site_term(node.right, sites), site_term(node.left, sites)
            if right is not None and not calls_in(node.left, sites):
                call = self.emit(right[0], right[1], self.visit(node.left), False)
                return node if call is None else call
            if left is not None and not calls_in(node.right, sites):
                call = self.emit(left[0], left[1], self.visit(node.right), True)
                return node if call is None else call
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        site = site_call(node, self.scope.sites)
        if site is not None:
            if calls_in(node.args[0], self.scope.sites):
                raise DeriveError("rewrite", "a site call nested in another site's branch")
            call = self.emit(site, node.args[0], None)
            return node if call is None else call
        return self.generic_visit(node)


def _op_call(
    site: str, base: ast.expr | None, branch: str, params: list[str], branch_first: bool
) -> ast.Call:
    """``rows(self, site, branch, args)``, or ``add(self, site, base, branch, args)`` for a
    residual sum ``base + branch`` (``radd`` for ``branch + base``)."""
    args = ast.Tuple(elts=[ast.Name(p, ast.Load()) for p in params], ctx=ast.Load())
    self_ = ast.Name("self", ast.Load())
    fn = ast.Name(branch, ast.Load())
    site_name = ast.Constant(site)
    if base is None:
        return ast.Call(ast.Name(ROWS, ast.Load()), [self_, site_name, fn, args], [])
    op = RADD if branch_first else ADD
    return ast.Call(ast.Name(op, ast.Load()), [self_, site_name, base, fn, args], [])
