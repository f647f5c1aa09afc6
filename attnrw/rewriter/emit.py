"""Emit matcher expressions as graph nodes, with example values so later passes and serialisation see them."""

from __future__ import annotations

from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, GraphModule, Node

import attnrw.opargs as opargs
from attnrw.patterns import expr as E
from attnrw.patterns.graph import val

aten = torch.ops.aten


class Emitter:
    """Creates nodes for expressions at the graph's current insertion point."""

    def __init__(self, gm: GraphModule) -> None:
        self.graph: Graph = gm.graph
        vals = [val(n) for n in gm.graph.nodes if n.op == "placeholder"]
        self.fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        self.result: Node | None = None

    def emit(self, x: Any) -> Any:
        if isinstance(x, Node):
            return x
        if x is E.RESULT:
            assert self.result is not None, "RESULT emitted before the op"
            return self.result
        if isinstance(x, E.SizeOf):
            of = self.emit(x.of)
            size = val(of).shape[x.dim]
            if isinstance(size, int):
                return size
            return self.call(aten.sym_size.int, (of, x.dim % val(of).dim()))
        if isinstance(x, E.Expr):
            args = tuple(self.emit(a) for a in x.args)
            kwargs = {k: self.emit(v) for k, v in x.kwargs}
            return self.call(x.op, args, kwargs)
        if isinstance(x, list):
            return [self.emit(a) for a in x]
        if isinstance(x, tuple):
            return tuple(self.emit(a) for a in x)
        return x

    def call(self, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
        node = self.graph.call_function(target, args, kwargs or {})
        node.meta["val"] = self._fake(target, args, kwargs or {})
        return node

    def call_named(self, target: Any, values: dict[str, Any]) -> Node:
        """Call ``target`` with its arguments by name (see :func:`attnrw.opargs.call_args`)."""
        args, kwargs = opargs.call_args(target, values)
        return self.call(target, args, kwargs)

    def _fake(self, target: Any, args: tuple, kwargs: dict) -> Any:
        def load(a: Any) -> Any:
            return val(a) if isinstance(a, Node) else a

        fargs = torch.fx.node.map_aggregate(args, load)
        fkwargs = torch.fx.node.map_aggregate(kwargs, load)
        if self.fake_mode is None:
            return None
        with self.fake_mode:
            return target(*fargs, **fkwargs)

    def restride(self, out: Node, like: Node) -> Node:
        """Copy ``out`` into ``like``'s memory layout when they differ.

        Code after the site may ``view`` the original value, which only works
        with the strides it had.
        """
        ov, lv = val(out), val(like)
        if not isinstance(ov, torch.Tensor) or not isinstance(lv, torch.Tensor):
            return out
        if _same_strides(ov, lv):
            return out
        perm = _memory_order(lv)
        if perm == list(range(lv.dim())):
            return self.call(aten.clone.default, (out,), {"memory_format": torch.contiguous_format})
        inv = [perm.index(i) for i in range(len(perm))]
        p = self.call(aten.permute.default, (out, perm))
        c = self.call(aten.clone.default, (p,), {"memory_format": torch.contiguous_format})
        return self.call(aten.permute.default, (c, inv))


def _memory_order(t: torch.Tensor) -> list[int]:
    """Dims from outermost to innermost in memory (stable for equal strides)."""
    from attnrw.patterns.graph import hint

    strides = [hint(s) for s in t.stride()]
    return sorted(range(t.dim()), key=lambda i: (-strides[i], i))


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    from attnrw.patterns.graph import hint, same_shape

    if not same_shape(tuple(a.shape), tuple(b.shape)):
        return False
    for size, sa, sb in zip(a.shape, a.stride(), b.stride()):
        if hint(size) > 1 and hint(sa) != hint(sb):
            return False
    return True
