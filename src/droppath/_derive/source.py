"""Reading a block class's ``forward``: its installed source, parsed into a syntax tree.

A forward this cannot read (no Python function, no source, a closure over local names) raises
``DeriveError`` with step ``"parse"``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from dataclasses import dataclass

from droppath._derive.errors import DeriveError

__all__ = ["Source", "read"]


@dataclass(frozen=True)
class Source:
    """A forward as read: the function, its syntax tree (which the rewrite changes), the names
    of its parameters and the statements of its body (its docstring left out)."""

    fn: types.FunctionType
    tree: ast.FunctionDef
    params: list[str]
    body: list[ast.stmt]


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


def read(cls: type) -> Source:
    """The ``forward`` of ``cls`` (or of the first class of its MRO that defines one)."""
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
    return Source(fn, fdef, params, body)
