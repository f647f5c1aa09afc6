"""Small expression trees over graph nodes: how to build a tensor the rewrite needs.

A matcher describes the inputs of the fused op (queries, keys, values, mask in
the canonical (batch, heads, seq, dim) layout) as :class:`Expr` trees over
existing nodes, without touching the graph. The rewriter *emits* them as new
nodes; the mask analysis *evaluates* them on concrete tensors. One tree, two
interpreters, so what is analysed is what is emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

aten = torch.ops.aten


@dataclass(frozen=True)
class SizeOf:
    """Dimension ``dim`` of the tensor ``of`` (an Expr or a Node); symbolic sizes stay symbolic."""

    of: Any
    dim: int


class _Result:
    """Placeholder for the fused op's output inside an output expression."""

    def __repr__(self) -> str:
        return "RESULT"


RESULT = _Result()


@dataclass(frozen=True)
class Expr:
    """``op(*args, **kwargs)`` where args may hold Nodes, Exprs, SizeOfs, lists of them, or constants."""

    op: Callable[..., Any]
    args: tuple = ()
    kwargs: tuple = ()

    def __repr__(self) -> str:
        name = getattr(self.op, "__name__", str(self.op))
        return f"{name}({', '.join(map(repr, self.args))})"


Term = Any  # Node | Expr


def reshape(x: Term, dims: list) -> Expr:
    return Expr(aten.reshape.default, (x, list(dims)))


def unsqueeze(x: Term, dim: int) -> Expr:
    return Expr(aten.unsqueeze.default, (x, dim))


def squeeze(x: Term, dim: int) -> Expr:
    return Expr(aten.squeeze.dim, (x, dim))


def transpose(x: Term, a: int, b: int) -> Expr:
    return Expr(aten.transpose.int, (x, a, b))


def permute(x: Term, dims: list) -> Expr:
    return Expr(aten.permute.default, (x, list(dims)))


def expand(x: Term, dims: list) -> Expr:
    return Expr(aten.expand.default, (x, list(dims)))


def add(a: Term, b: Term) -> Expr:
    return Expr(aten.add.Tensor, (a, b))


def mul(a: Term, b: Any) -> Expr:
    return Expr(aten.mul.Tensor, (a, b))


def neg(a: Term) -> Expr:
    return Expr(aten.neg.default, (a,))


def where(cond: Term, a: Any, b: Any, dtype: torch.dtype = torch.float32) -> Expr:
    """``where(cond, a, b)``; Python numbers become 0-dim tensors of ``dtype``."""
    return Expr(aten.where.self, (cond, _as_tensor(a, dtype), _as_tensor(b, dtype)))


def cast(x: Term, dtype: torch.dtype) -> Expr:
    return Expr(aten._to_copy.default, (x,), (("dtype", dtype),))


def _as_tensor(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, (int, float)):
        return Expr(aten.scalar_tensor.default, (float(x),), (("dtype", dtype),))
    return x


def evaluate(x: Any, env: Callable[[Node], Any], result: Any = None) -> Any:
    """Evaluate an expression eagerly; ``env`` gives each Node's concrete value."""
    if isinstance(x, Node):
        return env(x)
    if isinstance(x, _Result):
        return result
    if isinstance(x, SizeOf):
        return int(evaluate(x.of, env, result).shape[x.dim])
    if isinstance(x, Expr):
        args = [evaluate(a, env, result) for a in x.args]
        kwargs = {k: evaluate(v, env, result) for k, v in x.kwargs}
        return x.op(*args, **kwargs)
    if isinstance(x, (list, tuple)):
        return type(x)(evaluate(a, env, result) for a in x)
    return x


def nodes_in(x: Any) -> list[Node]:
    """The graph nodes an expression reads."""
    out: list[Node] = []
    if isinstance(x, Node):
        out.append(x)
    elif isinstance(x, SizeOf):
        out += nodes_in(x.of)
    elif isinstance(x, Expr):
        for a in x.args:
            out += nodes_in(a)
        for _, v in x.kwargs:
            out += nodes_in(v)
    elif isinstance(x, (list, tuple)):
        for a in x:
            out += nodes_in(a)
    return out
