"""Swap a module's class in place for its own class with a mixin (``accelerate``, ``layer_drop``).

The new class keeps the module's class name, qualified name and module, so that code that looks
a class up by name (FSDP wrapping policies, say) still finds it, while ``isinstance`` with the
original class still holds. It is made once per mixin, class and key, and a module of it pickles
and deep-copies as itself: pickle could not find the made class by name, so it stores how to
make it again (the mixin, the class, the key and the namespace function) and makes it when
loading.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from torch import nn

__all__ = ["Namespace", "mixed_class", "own_class", "swap_class", "unswap_class"]

# More class attributes for the made class: ``namespace(cls, key)``, a module-level function
# (pickled by reference).
Namespace = Callable[[type, Any], dict[str, Any]]

_MADE = "_droppath_swap"  # on a made class: (mixin, cls, key, namespace)
_CLASSES: dict[tuple[type, type, Hashable], type] = {}


def mixed_class(
    mixin: type, cls: type, key: Hashable = None, *, namespace: Namespace | None = None
) -> type:
    """``cls`` with ``mixin`` mixed in, under ``cls``'s names, made once per ``(mixin, cls,
    key)``; ``namespace(cls, key)`` gives more class attributes."""
    made = _CLASSES.get((mixin, cls, key))
    if made is None:
        attrs = {} if namespace is None else dict(namespace(cls, key))
        attrs.update(
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__reduce_ex__": _reduce_ex,
                _MADE: (mixin, cls, key, namespace),
            }
        )
        made = type(cls.__name__, (mixin, cls), attrs)
        _CLASSES[(mixin, cls, key)] = made
    return made


def _made(cls: type, mixin: type) -> type | None:
    """The class in ``cls``'s MRO that ``mixed_class`` made with ``mixin``, if any.

    It is ``cls`` itself after ``swap_class``; a wrapper that subclasses the module's class
    afterwards (FSDP2's ``fully_shard``, a user's subclass) puts it further up.
    """
    for klass in cls.__mro__:
        made = klass.__dict__.get(_MADE)
        if made is not None and made[0] is mixin:
            return klass
    return None


def own_class(module: nn.Module, mixin: type) -> type:
    """The class of ``module`` under ``mixin``, if ``swap_class`` mixed it in, else its
    class. A class that subclasses the mixed class (a wrapper's) is looked through."""
    made = _made(type(module), mixin)
    own: type = made.__dict__[_MADE][1] if made is not None else type(module)
    return own


_REBASED: dict[tuple[type, type, type], type] = {}


def _rebased(cls: type, old: type, new: type) -> type:
    """``cls`` with ``old`` replaced by ``new`` among its bases, at any depth: the same name,
    namespace and other bases (a wrapper class made over ``old``, made again over ``new``)."""
    if cls is old:
        return new
    key = (cls, old, new)
    made = _REBASED.get(key)
    if made is None:
        bases = tuple(_rebased(b, old, new) if issubclass(b, old) else b for b in cls.__bases__)
        attrs = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        made = type(cls)(cls.__name__, bases, attrs)
        _REBASED[key] = made
    return made


def swap_class(
    module: nn.Module, mixin: type, key: Hashable = None, *, namespace: Namespace | None = None
) -> type:
    """Make ``module`` an instance of its own class with ``mixin`` mixed in, in place: its
    attributes, parameters, buffers and state-dict keys do not change. A module swapped before
    with ``mixin`` gets the class for the new ``key``. Returns the new class.

    Examples:
        >>> import copy
        >>> from torch import nn
        >>> from droppath._swap import own_class, swap_class
        >>> class Loud:
        ...     def extra_repr(self):
        ...         return "loud"
        >>> lin = nn.Linear(2, 2)
        >>> cls = swap_class(lin, Loud)
        >>> lin, type(lin).__name__, own_class(lin, Loud) is nn.Linear
        (Linear(loud), 'Linear', True)
        >>> type(copy.deepcopy(lin)) is cls and swap_class(nn.Linear(3, 3), Loud) is cls
        True
    """
    cls = type(module)
    old = _made(cls, mixin)
    made = mixed_class(mixin, own_class(module, mixin), key, namespace=namespace)
    if old is None:  # the module's class, or a wrapper's over it (FSDP2's): mixed in there
        module.__class__ = made
    else:  # mixed before: the new mixed class takes the old one's place under any wrapper
        module.__class__ = _rebased(cls, old, made)
    return made


def unswap_class(module: nn.Module, mixin: type) -> type:
    """Undo ``swap_class``: ``module`` back to its own class, under any wrapper class made over
    the mixed one (FSDP2's). Returns the new class."""
    cls = type(module)
    old = _made(cls, mixin)
    if old is not None:
        module.__class__ = _rebased(cls, old, old.__dict__[_MADE][1])
    return type(module)


def _reduce_ex(self: Any, protocol: Any) -> Any:
    return (_rebuild, getattr(type(self), _MADE), self.__getstate__())


def _rebuild(mixin: type, cls: type, key: Hashable, namespace: Namespace | None) -> Any:
    """An empty module of the made class, for unpickling (its state comes next)."""
    return object.__new__(mixed_class(mixin, cls, key, namespace=namespace))
