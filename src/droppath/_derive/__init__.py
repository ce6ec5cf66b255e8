"""Derive, from a block class's installed source, a training forward that skips dropped work.

``derive`` reads the class's ``forward`` (``inspect`` + ``ast``) and writes a new one in which
every call of a drop-path site, ``self.<site>(...)``, runs its branch on the kept samples only:

- **a residual sum**: ``a + self.drop_path(g(x))`` (either order, ``+=``, in a ``return``, the
  shortcut any expression) becomes ``add(self, "drop_path", a, branch, args)``, which runs
  ``branch`` on the kept rows and adds them into ``a`` (``droppath._derive.ops``);
- **a row-wise module after the site**, ``a + self.ls(self.drop_path(g(x)))``, is part of the
  branch (it runs on the kept rows only);
- **the branch**: the expression inside the call, extended backwards over the statements that
  compute it since the shortcut was taken (``shortcut = x; x = f(x); ...; x = self.drop_path(x) +
  shortcut``), statements under an ``if`` included, as long as moving them changes nothing the
  rest of the forward reads. The statements become a function of their own, whose arguments (the
  block, the input, side inputs) are gathered at the kept rows when they hold one row per sample;
- **any other use** of a site (its output concatenated, returned, ...) becomes ``rows(...)``: the
  branch runs on the kept rows, and the dropped rows are zeros.

Nothing here is trusted: ``verify`` runs the result against the class's own forward under the
same keep decisions before a block uses it. A forward this package cannot read or rewrite raises
``DeriveError``, which says which step failed and why, in one line.

The steps, one module each: ``source`` reads the forward; ``inline`` puts the body of a helper
method that holds the sites in its place; ``analysis`` tells what each statement
assigns and reads; ``forms`` matches the uses of a site; ``region`` chooses the statements that
move into a branch; ``terms`` replaces the site terms by the op calls; ``rewrite`` walks the
statements; ``codegen`` compiles the result; ``verify`` checks it by running it.
"""

from __future__ import annotations

from collections.abc import Collection

from droppath._derive.codegen import Derived, generate
from droppath._derive.errors import NOTHING_TO_SKIP, DeriveError
from droppath._derive.forms import calls_in
from droppath._derive.inline import inline_expressions, inline_helpers
from droppath._derive.region import Scope
from droppath._derive.rewrite import Rewriter
from droppath._derive.source import read
from droppath._derive.verify import verify

__all__ = ["NOTHING_TO_SKIP", "DeriveError", "Derived", "derive", "derive_candidates", "verify"]


def derive(
    cls: type, sites: Collection[str], *, keep_shared: bool = False, regroup: bool = False
) -> Derived:
    """The training forward of ``cls`` with the work of dropped samples at ``sites`` skipped.

    ``keep_shared``: statements whose values the rest of the forward reads stay out of the
    branches (a second, more conservative rewrite, tried when the first fails its check).
    ``regroup``: a branch stops at a statement that regroups rows by the batch size
    (``x.reshape(B * T, ...)``), so that a site that drops rows of ``B * T`` (per frame, per
    location) gathers them where they are made (a third rewrite, tried when both fail).

    Raises:
        DeriveError: the source cannot be read (``parse``) or a site's use cannot be rewritten
            (``rewrite``).
    """
    source = read(cls)
    body = source.body
    if not any(calls_in(stmt, sites) for stmt in body):  # the sites sit in a helper method
        body = inline_helpers(cls, source.fn, body, sites)
    body = inline_expressions(cls, source.fn, body, sites)  # x + self.h(x), h a site's return
    rewriter = Rewriter(Scope.of(sites, source.params, body, keep_shared, regroup))
    try:
        new_body = rewriter.block(body, [])
    except DeriveError:
        raise
    except Exception as error:  # a form this rewriter does not foresee: never the user's error
        raise DeriveError("rewrite", f"{type(error).__name__}: {error}") from None
    output = rewriter.output
    if not output.branches:
        if output.kept:
            raise DeriveError("rewrite", f"{cls.__qualname__}: {NOTHING_TO_SKIP}")
        raise DeriveError("rewrite", f"{cls.__qualname__}.forward calls no site directly")
    return generate(cls, source, new_body, output)


_DERIVED: dict[tuple[type, tuple[str, ...]], tuple[Derived, ...] | DeriveError] = {}


def derive_candidates(cls: type, sites: tuple[str, ...]) -> tuple[Derived, ...]:
    """The derived forwards of ``cls`` for ``sites``, made once per class: the rewrite, then
    those that differ from it, in the order a failed check tries them: ``keep_shared``, then
    ``regroup``. Raises ``DeriveError`` (also remembered)."""
    key = (cls, sites)
    if key not in _DERIVED:
        try:
            made = [derive(cls, sites)]
            for keep_shared, regroup in ((True, False), (False, True)):
                try:
                    other = derive(cls, sites, keep_shared=keep_shared, regroup=regroup)
                except DeriveError:
                    continue
                if all(other.source != d.source for d in made):
                    made.append(other)
            _DERIVED[key] = tuple(made)
        except DeriveError as error:
            _DERIVED[key] = error
    found = _DERIVED[key]
    if isinstance(found, DeriveError):
        raise found
    return found
