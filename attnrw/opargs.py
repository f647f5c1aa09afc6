"""An op's arguments by name, through its schema: one way to build and to read them.

Code that emits an op builds its positional arguments with :func:`call_args`;
code that reads a node's arguments uses :func:`bind` or :func:`arg`. Nothing
outside an op's own package indexes ``node.args`` by position, so an op's
trailing arguments may be reordered or extended without touching its readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.fx import Node

__all__ = ["arg", "arg_names", "bind", "call_args"]

_MISSING = object()


def _schema(op: Any) -> torch.FunctionSchema:
    schema = getattr(op, "_schema", None)
    if schema is None:
        raise TypeError(f"{op!r} is not an OpOverload with a schema")
    return schema


def arg_names(op: Any) -> list[str]:
    """The names of ``op``'s arguments, in schema order."""
    return [a.name for a in _schema(op).arguments]


def bind(node_or_op: Any, args: tuple | None = None, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{argument name: value}`` of a call, defaults filled in.

    Takes an FX node calling an ``OpOverload``, or the op with its ``args``
    and ``kwargs``. An argument with neither a value nor a default is left out.
    """
    if isinstance(node_or_op, Node):
        op, args, kwargs = node_or_op.target, node_or_op.args, node_or_op.kwargs
    else:
        op = node_or_op
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    out: dict[str, Any] = {}
    for i, a in enumerate(_schema(op).arguments):
        if i < len(args) and not a.kwarg_only:
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def arg(node: Node, name: str, default: Any = _MISSING) -> Any:
    """One argument of a node's call by name; ``default`` (or ``KeyError``) where the call has none."""
    bound = bind(node)
    if name in bound:
        return bound[name]
    if default is _MISSING:
        raise KeyError(f"{node.target} has no argument {name!r} (it takes {', '.join(arg_names(node.target))})")
    return default


def call_args(op: Any, values: Mapping[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` calling ``op`` with ``values`` by name, in schema order.

    Positional arguments are given positionally (what FX graphs and
    serialisation expect), keyword-only ones as keywords. A name the schema
    does not have is a ``TypeError``; a missing one takes the schema's default.
    """
    schema = _schema(op)
    names = {a.name for a in schema.arguments}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(
            f"{schema.name} has no argument(s) {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(a.name for a in schema.arguments)}"
        )
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for a in schema.arguments:
        if a.name in values:
            value = values[a.name]
        elif a.has_default_value():
            value = a.default_value
        else:
            raise TypeError(f"{schema.name}: no value for its argument {a.name!r}")
        if a.kwarg_only:
            kwargs[a.name] = value
        else:
            args.append(value)
    return tuple(args), kwargs
