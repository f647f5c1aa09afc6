"""What matchers may know about a graph beyond its structure.

Concrete values of placeholders (the example inputs, parameters, buffers and
constants) let a matcher *evaluate* small subgraphs -- a mask built from
positions, a constant fill value -- instead of guessing from their spelling.
Nothing here changes the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node

from attnrw.patterns.graph import ancestors as _ancestors
from attnrw.patterns.graph import aten, is_cast, is_order_preserving, tensor_val

log = logging.getLogger("attnrw.patterns")

# Ops through which a tensor stays "the same tokens": a query and a key that
# reach a common node through these alone are one aligned sequence.
_POINTWISE_PREFIXES = (
    "add", "sub", "mul", "div", "neg", "rsqrt", "sqrt", "pow", "exp", "tanh", "gelu", "silu", "relu",
    "sigmoid", "cos", "sin", "where", "erf", "clamp", "abs", "masked_fill", "cat", "split", "slice",
    "select", "expand", "permute", "transpose", "t", "view", "reshape", "_unsafe_view", "clone",
    "unsqueeze", "squeeze", "flatten", "unflatten", "alias", "detach", "_to_copy", "convert_element_type",
    "contiguous", "native_layer_norm", "layer_norm", "mean", "var", "var_mean", "sum", "rms_norm",
    "_fused_rms_norm", "lift_fresh_copy", "getitem", "split_with_sizes", "chunk", "unbind", "rsub",
)
_PROJECTIONS = {aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default, aten.linear.default}

_MAX_EVAL_NODES = 2000


class MatchContext:
    """Per-graph knowledge shared by the matchers of one pass.

    ``values`` maps placeholder nodes to concrete values (tensors or ints)
    where known; ``user_inputs`` are the placeholders that carry the caller's
    data (as opposed to parameters, buffers and constants).
    """

    def __init__(
        self,
        gm: GraphModule,
        values: Mapping[Node, Any] | None = None,
        user_inputs: set[Node] | None = None,
        constants: set[Node] | None = None,
    ) -> None:
        self.gm = gm
        self._values: dict[Node, Any] = dict(values or {})
        self.user_inputs = set(user_inputs or ())
        self.constants = set(constants or ())
        self._constant: dict[Node, bool] = {}
        self._order: dict[Node, int] | None = None
        self._failed: set[Node] = set()
        self._static: dict[Node, bool] = {}
        self._roots: dict[Node, frozenset[Node]] = {}

    def for_copy(self, gm: GraphModule) -> MatchContext:
        """The same knowledge for a copy of the graph (placeholders matched by position)."""
        mine = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        theirs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        mapping = dict(zip(mine, theirs))
        return MatchContext(
            gm,
            {mapping[n]: v for n, v in self._values.items() if n in mapping},
            {mapping[n] for n in self.user_inputs if n in mapping},
            {mapping[n] for n in self.constants if n in mapping},
        )

    def placeholder_values(self) -> list[Any]:
        """The concrete value of every placeholder, in order (the graph's flat inputs)."""
        return [self._values.get(n) for n in self.gm.graph.nodes if n.op == "placeholder"]

    # -- evaluation -------------------------------------------------------
    def value(self, node: Node) -> Any:
        """The concrete value of ``node``, evaluated from known placeholders; ``None`` if unknown."""
        if node in self._values:
            return self._values[node]
        if node in self._failed:
            return None
        order = self._plan(node)
        if order is None:
            self._failed.add(node)
            return None
        for n in order:
            if n in self._values:
                continue
            try:
                self._values[n] = self._run(n)
            except Exception as e:  # an op we cannot run eagerly: the value stays unknown
                log.debug("cannot evaluate %s: %s", n.name, e)
                self._failed.add(node)
                return None
        return self._values[node]

    def _plan(self, node: Node) -> list[Node] | None:
        order: list[Node] = []
        seen: set[Node] = set()
        stack: list[tuple[Node, bool]] = [(node, False)]
        while stack:
            n, done = stack.pop()
            if done:
                order.append(n)
                continue
            if n in seen or n in self._values:
                continue
            seen.add(n)
            if n in self._failed or n.op == "placeholder" or len(seen) > _MAX_EVAL_NODES:
                return None
            if n.op not in ("call_function", "get_attr"):
                return None
            stack.append((n, True))
            for inp in n.all_input_nodes:
                stack.append((inp, False))
        return order

    def _run(self, n: Node) -> Any:
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj

        def load(a: Any) -> Any:
            return self._values[a] if isinstance(a, Node) else a

        args = torch.fx.node.map_aggregate(n.args, load)
        kwargs = torch.fx.node.map_aggregate(n.kwargs, load)
        return n.target(*args, **kwargs)

    # -- dependence -------------------------------------------------------
    def depends_on_user_input(self, nodes: list[Node]) -> bool:
        todo, seen = list(nodes), set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.user_inputs:
                return True
            todo.extend(n.all_input_nodes)
        return False

    def depends_on(self, node: Node, target: Node) -> bool:
        """Whether ``target`` is an ancestor of (or is) ``node``.

        Only nodes after ``target`` in graph order can depend on it, which
        bounds the search to the stretch of graph between them.
        """
        if self._order is None:
            self._order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        limit = self._order[target]
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            if n is target:
                return True
            if n in seen or self._order.get(n, -1) < limit:
                continue
            seen.add(n)
            todo.extend(n.all_input_nodes)
        return False

    def is_static(self, node: Node) -> bool:
        """Whether a node depends only on parameters, buffers and constants."""
        if node in self._static:
            return self._static[node]
        stack = [node]
        order: list[Node] = []
        while stack:
            n = stack.pop()
            if n in self._static or n in order:
                continue
            order.append(n)
            stack.extend(i for i in n.all_input_nodes if i not in self._static)
        for n in reversed(order):
            if n.op == "placeholder":
                self._static[n] = n not in self.user_inputs
            elif n.op == "get_attr":
                self._static[n] = True
            else:
                self._static[n] = all(self._static.get(i, False) for i in n.all_input_nodes)
        return self._static[node]

    def is_constant(self, node: Node) -> bool:
        """Whether a node's value is fixed: built from literals and constant tensors only.

        Parameters and buffers are not constants (training or the user may
        change them), so their values are never baked into a rewrite.
        """
        if node in self._constant:
            return self._constant[node]
        ok = True
        for n in ancestors_of(node):
            if n.op == "placeholder" and n not in self.constants:
                ok = False
                break
        self._constant[node] = ok
        return ok

    def token_roots(self, node: Node) -> frozenset[Node]:
        """The nodes a tensor comes from through token-wise ops only (projections, norms, pointwise, views).

        Two tensors with a common root are built from the same tokens; a query
        and a key without one (cross-attention, spatially reduced keys) are
        not one aligned sequence.
        """
        if node in self._roots:
            return self._roots[node]
        order: list[Node] = []
        stack = [node]
        seen: set[Node] = set()
        while stack:
            n = stack.pop()
            if n in self._roots or n in seen:
                continue
            seen.add(n)
            order.append(n)
            stack.extend(self._token_inputs(n))
        for n in reversed(order):
            ins = self._token_inputs(n)
            if not ins:
                self._roots[n] = frozenset((n,))
            else:
                acc: set[Node] = set()
                for i in ins:
                    acc |= self._roots.get(i, frozenset((i,)))
                self._roots[n] = frozenset(acc)
        return self._roots[node]

    def _token_inputs(self, n: Node) -> list[Node]:
        if n.op != "call_function":
            return []
        if n.target in _PROJECTIONS:
            acts = [i for i in n.all_input_nodes if not self.is_static(i)]
            return acts if len(acts) == 1 else []
        name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
        if is_order_preserving(n) or is_cast(n) or name in _POINTWISE_PREFIXES:
            return [i for i in n.all_input_nodes if not self.is_static(i) and _is_tensor_like(i)]
        return []


def ancestors_of(node: Node) -> set[Node]:
    return _ancestors([node])


def _is_tensor_like(node: Node) -> bool:
    """A tensor, or a tuple of tensors (``split`` before its ``getitem``)."""
    v = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(v, (list, tuple)):
        return any(isinstance(x, torch.Tensor) for x in v)
    return tensor_val(node) is not None
