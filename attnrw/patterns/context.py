"""What matchers may know about a graph beyond its structure.

Concrete values of placeholders (the example inputs, parameters, buffers and
constants) let a matcher *evaluate* small subgraphs -- a mask built from
positions, a constant fill value -- instead of guessing from their spelling.
Nothing here changes the graph.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node

from attnrw.patterns.graph import ancestors as _ancestors
from attnrw.patterns.graph import aten, hint, same, shape, view_groups
from attnrw.patterns.tokens import Loc, token_inputs

log = logging.getLogger("attnrw.patterns")

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
        self._roots: dict[tuple[Node, Loc], frozenset[tuple[Node, Loc]]] = {}
        self._token_steps: dict[tuple[Node, Loc], list | None] = {}

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
        def inputs(n: Node) -> list[Node] | None:
            if n in self._failed or n.op not in ("call_function", "get_attr"):
                return None
            return n.all_input_nodes

        return post_order(node, lambda n: n in self._values, inputs)

    def _run(self, n: Node) -> Any:
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj

        return call_with(n, self._values)

    # -- dependence -------------------------------------------------------
    def depends_on_user_data(self, nodes: list[Node]) -> bool:
        """Whether the values (not only the sizes) of user inputs reach ``nodes``.

        A size read off an input (``sym_size``, a dynamo size placeholder) is
        not its data: a mask built from the sequence length alone is the same
        for every input of that length.
        """
        todo, seen = list(nodes), set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if is_shape_value(n):
                continue
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
        order = post_order(node, lambda n: n in self._static, lambda n: n.all_input_nodes, limit=None)
        for n in order or ():
            if n.op == "placeholder":
                self._static[n] = n not in self.user_inputs
            elif n.op == "get_attr":
                self._static[n] = True
            else:
                self._static[n] = all(self._static[i] for i in n.all_input_nodes)
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

    def token_roots(self, node: Node, loc: Loc) -> frozenset[tuple[Node, Loc]]:
        """Where the tokens at ``loc`` in ``node`` come from, through ops token-wise along them.

        Each root is a node and where the same tokens lie in it (see
        :mod:`attnrw.patterns.tokens`). Two tensors with a common root are
        built position for position from the same tokens; a query and a key
        without one (cross-attention, spatially reduced keys, a convolution
        that mixes positions on one side only) are not proven one aligned
        sequence.
        """
        todo: list[tuple[tuple[Node, Loc], bool]] = [((node, loc), False)]
        pending: set[tuple[Node, Loc]] = set()
        while todo:
            state, done = todo.pop()
            if state in self._roots:
                continue
            ins = self._token_steps.get(state)
            if ins is None and state not in self._token_steps:
                ins = token_inputs(state[0], state[1], self.is_static)
                self._token_steps[state] = ins
            if ins is None:
                self._roots[state] = frozenset((state,))
                continue
            if done:
                self._roots[state] = frozenset().union(*(self._roots.get(i, frozenset()) for i in ins))
                continue
            if state in pending:
                continue  # (graphs are acyclic: only reached again through another path)
            pending.add(state)
            todo.append((state, True))
            todo.extend((i, False) for i in ins if i not in self._roots)
        return self._roots[(node, loc)]


def post_order(
    root: Node,
    known: Callable[[Node], bool],
    inputs: Callable[[Node], list[Node] | None],
    limit: int | None = _MAX_EVAL_NODES,
) -> list[Node] | None:
    """``root`` and the ancestors reached through ``inputs`` that are not ``known``, each after its inputs.

    ``inputs(n)`` lists the nodes to go on into (``None`` gives up: the whole
    answer is ``None``), as does passing ``limit`` nodes.
    """
    order: list[Node] = []
    seen: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        n, done = stack.pop()
        if done:
            order.append(n)
            continue
        if n in seen or known(n):
            continue
        seen.add(n)
        ins = inputs(n)
        if ins is None or (limit is not None and len(seen) > limit):
            return None
        stack.append((n, True))
        stack.extend((i, False) for i in ins)
    return order


def call_with(n: Node, values: Mapping[Node, Any]) -> Any:
    """Run a call node on the values of its inputs."""

    def load(a: Any) -> Any:
        return values[a] if isinstance(a, Node) else a

    return n.target(*torch.fx.node.map_aggregate(n.args, load), **torch.fx.node.map_aggregate(n.kwargs, load))


def ancestors_of(node: Node) -> set[Node]:
    return _ancestors([node])


def ancestors_of_all(nodes: list[Node], limit: int = _MAX_EVAL_NODES) -> set[Node] | None:
    """The ancestors of ``nodes`` (inclusive), or None when there are more than ``limit``."""
    seen: set[Node] = set()
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return None
        todo.extend(n.all_input_nodes)
    return seen


def is_shape_value(n: Node) -> bool:
    """A node whose value is a size of the inputs: an int, or a SymInt over backed size symbols only.

    (A SymInt read from data, ``item()`` of a tensor, is an unbacked symbol and not a size.)
    """
    v = n.meta.get("val", n.meta.get("example_value"))
    if isinstance(v, torch.SymInt):
        known = backed_values(v)
        return all(s in known for s in v.node.expr.free_symbols)
    return isinstance(v, int) and not isinstance(v, bool) and n.op != "placeholder"


def backed_values(v: Any) -> Mapping:
    """The example values of the backed size symbols of a SymInt's shape environment."""
    env = v.node.shape_env
    known = getattr(env, "backed_var_to_val", None)
    return known if known is not None else env.var_to_val


class Unknown(Exception):
    """A value that cannot be computed from what the context knows."""


def free_symbols(x: Any) -> frozenset:
    """The size symbols in a node's example value (a SymInt, or a tensor's shape)."""
    v = x.meta.get("val", x.meta.get("example_value")) if isinstance(x, Node) else x
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return frozenset(v.node.expr.free_symbols)
    if isinstance(v, torch.Tensor):
        out: set = set()
        for d in v.shape:
            if isinstance(d, torch.SymInt):
                out |= d.node.expr.free_symbols
        return frozenset(out)
    if isinstance(v, (list, tuple)):
        acc: set = set()
        for e in v:
            acc |= free_symbols(e)
        return frozenset(acc)
    return frozenset()


class Resized:
    """Values of a graph's nodes as they would be if it ran with other sizes.

    ``subs`` maps size symbols to new values. A node whose example value is a
    symbolic size is that size's expression under ``subs``; a tensor node
    that depends on a substituted symbol is recomputed from its inputs; one
    that does not is its value at the example sizes. A user input whose
    shape changes cannot be made up, so anything built from one is
    :class:`Unknown`. This is how a mask built from positions is checked at
    lengths other than the traced one.
    """

    def __init__(self, ctx: MatchContext, subs: Mapping[Any, int]) -> None:
        self.ctx = ctx
        self.subs = dict(subs)
        self._values: dict[Node, Any] = {}
        self._moves: dict[Node, bool] = {}

    def _sym(self, v: Any) -> Any:
        expr = v.node.expr
        env = dict(self.subs)
        var_to_val = backed_values(v)
        for s in expr.free_symbols - set(env):
            if s not in var_to_val:
                raise Unknown(f"no value for {s}")
            env[s] = var_to_val[s]
        out = expr.xreplace(env)
        if isinstance(v, torch.SymBool):
            return bool(out)
        return int(out) if isinstance(v, torch.SymInt) else float(out)

    def size(self, d: Any) -> int:
        """A dimension (an int or a SymInt) under the substitution."""
        if isinstance(d, torch.SymInt):
            return self._sym(d)
        return int(d)

    def moves(self, node: Node) -> bool:
        """Whether the node's value changes with the substituted sizes."""
        keys = set(self.subs)
        for n in post_order(node, lambda n: n in self._moves, lambda n: n.all_input_nodes, limit=None) or ():
            self._moves[n] = bool(free_symbols(n) & keys) or any(self._moves[i] for i in n.all_input_nodes)
        return self._moves[node]

    def value(self, node: Node) -> Any:
        if node in self._values:
            return self._values[node]
        if not self.moves(node):
            v = self.ctx.value(node)
            if v is None:
                raise Unknown(node.name)
            return v
        order = post_order(
            node,
            lambda n: n in self._values,
            lambda n: n.all_input_nodes if self._direct(n) is None and self.moves(n) else [],
        )
        if order is None:
            raise Unknown("subgraph too large")
        for n in order:
            if n not in self._values:
                self._values[n] = self._compute(n)
        return self._values[node]

    def _direct(self, n: Node) -> Any:
        """A size value read off the example value, or None when it must be computed."""
        v = n.meta.get("val", n.meta.get("example_value"))
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) and v.node.expr.free_symbols & set(self.subs):
            return v
        return None

    def _compute(self, n: Node) -> Any:
        v = self._direct(n)
        if v is not None:
            return self._sym(v)
        if not self.moves(n):
            out = self.ctx.value(n)
            if out is None:
                raise Unknown(n.name)
            return out
        if n.op != "call_function":
            raise Unknown(f"{n.name} changes with the sizes and is an input")
        try:
            return call_with(n, self._values)
        except Exception as e:  # the op does not run at these sizes (e.g. a buffer too short)
            raise Unknown(f"{n.name}: {type(e).__name__}") from None


_AXIS_SAME = {
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default, aten._to_copy.default,
    aten.slice.Tensor, aten.expand.default, aten.lift_fresh_copy.default,
}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_LINEAR = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default}
_MAX_AXIS_STEPS = 64


def feature_axis(node: Any, axis: int, ctx: MatchContext) -> bool | None:
    """Whether axis ``axis`` of ``node`` is made of a projection's features (channels) rather than tokens.

    Followed back through layout ops (views that split or fold axes,
    permutes, selections, casts, pointwise ops) to the projection that
    made it: a linear layer's last axis and a convolution's channel axis are
    features, its other axes are not. ``None`` when the trail is lost. Channel
    attention (DaViT's channel blocks) attends over features: its scores
    are C×C, and a window over them would be a window over channels.
    """
    for _ in range(_MAX_AXIS_STEPS):
        if not isinstance(node, Node) or node.op != "call_function":
            return None
        t = node.target
        out = shape(node)
        if out is None:
            return None
        rank = len(out)
        axis %= rank
        if t in _LINEAR or t is aten.bmm.default:
            # A projection: activations times a weight (for addmm the bias comes first).
            x, w = (node.args[1], node.args[2]) if t is aten.addmm.default else (node.args[0], node.args[1])
            if t is not aten.linear.default and (not isinstance(w, Node) or not ctx.is_static(w)):
                return None  # a product of two activations: not a projection
            return axis == rank - 1
        if t is aten.convolution.default:
            return axis == 1
        if t is operator.getitem:
            src = node.args[0]
            if isinstance(src, Node) and src.target in (aten.split.Tensor, aten.split_with_sizes.default,
                                                        aten.chunk.default):
                node = src.args[0]
                continue
            if isinstance(src, Node) and src.target is aten.unbind.int:
                d = (src.args[1] if len(src.args) > 1 else 0) % (rank + 1)
                node, axis = src.args[0], axis + (axis >= d)
                continue
            return None
        src = node.args[0] if node.args else None
        if t is aten.permute.default:
            node, axis = src, list(node.args[1])[axis] % rank
        elif t is aten.transpose.int:
            a, b = node.args[1] % rank, node.args[2] % rank
            node, axis = src, (b if axis == a else a if axis == b else axis)
        elif t is aten.t.default:
            node, axis = src, rank - 1 - axis
        elif t is aten.unsqueeze.default:
            d = node.args[1] % rank
            if axis == d:
                return None
            node, axis = src, axis - (axis > d)
        elif t is aten.select.int:
            d = node.args[1] % (rank + 1)
            node, axis = src, axis + (axis >= d)
        elif t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            in_shape = shape(src) or ()
            dims = range(len(in_shape)) if len(node.args) < 2 else node.args[1]
            dims = {d % len(in_shape) for d in ([dims] if isinstance(dims, int) else dims)}
            kept = [i for i, n in enumerate(in_shape) if not (i in dims and same(n, 1))]
            if len(kept) != rank:
                return None
            node, axis = src, kept[axis]
        elif t in _VIEWS:
            src_shape = shape(src)
            if src_shape is None:
                return None
            a, b = [hint(d) for d in src_shape], [hint(d) for d in out]
            groups = view_groups(a, b)
            if groups is None:
                return None
            group = next((ga for ga, gb in groups if axis in gb), None)
            if group is None:
                return None
            answers = [feature_axis(src, g, ctx) for g in group]
            if any(x is True for x in answers):
                return True
            return False if all(x is False for x in answers) else None
        elif t in _AXIS_SAME or (hasattr(t, "tags") and torch.Tag.pointwise in t.tags) or t is aten.cat.default:
            if t is aten.cat.default:
                dim = (node.args[1] if len(node.args) > 1 else 0) % rank
                if dim == axis:
                    return None
                src = node.args[0][0]
            ins = [i for i in ([src] if t is aten.cat.default else node.all_input_nodes)
                   if len(shape(i) or ()) == rank and same(shape(i)[axis], out[axis]) and not ctx.is_static(i)]
            if not ins:
                return None
            node = ins[0]
        else:
            return None
    return None
