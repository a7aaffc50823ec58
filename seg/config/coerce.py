"""YAML values checked and converted against type annotations: ``coerce(value, tp)``.

Covers what the config dataclasses use: bool, int, float, str, ``Literal``, ``Optional`` /
unions, and tuples (fixed length, or ``tuple[T, ...]``), which YAML gives as lists.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin


class Mismatch(Exception):
    """A value does not match a type; the caller turns it into an error naming the key."""


def type_name(tp: Any) -> str:
    """``tp`` in words for error messages: "one of 'a', 'b'", "int or None", "list of 2 float"."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} {type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float, list -> tuple) or raise Mismatch."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        # type() check too, so that True does not pass for 1 and 16.0 not for 16
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise Mismatch
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return coerce(value, arg)
                except Mismatch:
                    pass
        raise Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise Mismatch
        elems = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(elems) != len(value):
            raise Mismatch
        return tuple(coerce(v, t) for v, t in zip(value, elems))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise Mismatch
