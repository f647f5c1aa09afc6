"""The result of a successful match, and the steps every matcher shares.

A :class:`Match` says how to build the fused op's inputs in the canonical
layout -- q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), a mask
broadcastable to (B, H, Sq, Sk) -- as expressions over existing nodes, which
node's uses receive the result and through what output expression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

from attnrw.patterns import expr as E
from attnrw.patterns import layout
from attnrw.patterns import tokens
from attnrw.patterns.graph import (
    aten,
    is_order_preserving,
    numel,
    same,
    same_shape,
    shape,
    tensor_val,
    walk_order_preserving,
)
from attnrw.patterns.context import MatchContext, feature_axis
from attnrw.patterns.site import AttentionSite


class NoMatch(Exception):
    """Raised inside a matcher with the reason a candidate is not rewritten."""


@dataclass
class Match:
    """How to replace one attention site by one fused op.

    ``q``, ``k``, ``v`` and ``mask`` are expressions (see :mod:`attnrw.patterns.expr`)
    in the canonical layout. ``replace`` is the node whose uses take
    ``output`` (an expression over ``expr.RESULT``, the op's (B, H, Sq, Dv)
    output). ``interior`` holds the nodes the rewrite makes dead.
    """

    site: AttentionSite
    q: Any
    k: Any
    v: Any
    mask: Any
    is_causal: bool
    scale: float
    replace: Node
    output: Any
    interior: set[Node] = field(default_factory=set)
    anchor: Node | None = None

    @property
    def softcap(self) -> float:
        """The op's ``softcap`` argument: the site's (0: the scores are not capped)."""
        return self.site.softcap


def _layout_chain(node: Any) -> list[Any]:
    """``[node, parent, ...]`` back through order-preserving ops and axis moves."""
    chain = walk_order_preserving(node)
    while isinstance(chain[-1], Node) and chain[-1].target in layout.AXIS_MOVES:
        chain.extend(walk_order_preserving(chain[-1].args[0]))
    return chain


def peel_to_shape(node: Any, target: tuple) -> Any:
    """The furthest tensor back through layout ops, holding ``node``'s elements in order, of shape ``target``.

    Order-preserving ops keep the row-major order of elements; so does a run
    of permutes and views that composes to no reordering (einsum moves an
    operand's axes and its ``bmm`` result moves them back), checked with
    :mod:`attnrw.patterns.layout`. That tensor reshaped to ``node``'s shape is
    ``node``; ``None`` if no tensor on the chain has the shape.
    """
    chain = _layout_chain(node)
    best = None
    for i, n in enumerate(chain):
        if same_shape(shape(n), target) and (
            all(is_order_preserving(m) for m in chain[:i]) or layout.keeps_order(chain[: i + 1])
        ):
            best = n
    return best


def peel_transposed(node: Any, target: tuple) -> Any:
    """The furthest tensor back through layout ops of shape ``target`` whose last two axes ``node`` swaps
    (:func:`attnrw.patterns.layout.transposes`); ``None`` if there is none."""
    chain = _layout_chain(node)
    best = None
    for i, n in enumerate(chain):
        if i and same_shape(shape(n), target) and layout.transposes(chain[: i + 1]):
            best = n
    return best


def canonical_bh(x: Any, batch_rank: int) -> Any:
    """(*Xb, a, b) -> (B, H, a, b): heads are the last batch axis, the rest folds into B."""
    if batch_rank == 2:
        return x
    if batch_rank == 1:
        return E.unsqueeze(x, 1)
    if batch_rank == 0:
        return E.unsqueeze(E.unsqueeze(x, 0), 0)
    return E.reshape(x, [-1, E.SizeOf(x, batch_rank - 1), E.SizeOf(x, batch_rank), E.SizeOf(x, batch_rank + 1)])


def from_canonical_bh(out: Any, batch_dims: tuple, ref: Any) -> Any:
    """Inverse of :func:`canonical_bh` for the op output; ``ref`` is a tensor of shape (*Xb, ...)."""
    rank = len(batch_dims)
    if rank == 2:
        return out
    if rank == 1:
        return E.squeeze(out, 1)
    if rank == 0:
        return E.squeeze(E.squeeze(out, 0), 0)
    dims = [E.SizeOf(ref, i) for i in range(rank)]
    return E.reshape(out, [*dims, E.SizeOf(out, 2), E.SizeOf(out, 3)])


def peel_repeat_kv(k_node: Any, heads: Any) -> tuple[Any, int | None]:
    """Undo ``repeat_kv`` (expand + reshape) on a (B, H, S, D) key/value tensor.

    Returns ``(source, kv_heads)`` with source (B, Hkv, S, D) when ``k_node`` is,
    through order-preserving ops, ``x[:, :, None].expand(B, Hkv, n, S, D)``
    reshaped to (B, Hkv·n, S, D); otherwise ``(k_node, None)``. Using the
    source is exact: the op repeats each kv head ``n`` times in the same order.
    """
    kshape = shape(k_node)
    if kshape is None or len(kshape) != 4:
        return k_node, None
    for n in walk_order_preserving(k_node)[1:]:
        if not (isinstance(n, Node) and n.target is aten.expand.default) or is_order_preserving(n):
            continue  # not an expand, or one that changes nothing (einsum writes those)
        src = n.args[0]
        s_shape, e_shape = shape(src), shape(n)
        if s_shape is None or e_shape is None or len(e_shape) != 5 or len(s_shape) != 5:
            return k_node, None
        if not (same(s_shape[2], 1) and same(s_shape[0], kshape[0]) and same_shape(s_shape[3:], kshape[2:])):
            return k_node, None
        if not same(e_shape[1] * e_shape[2], kshape[1]) or not same(s_shape[1], e_shape[1]):
            return k_node, None
        if isinstance(src, Node) and src.target is aten.unsqueeze.default and src.args[1] in (2, -3):
            return src.args[0], _int(e_shape[1])
        if isinstance(src, Node) and is_order_preserving(src):
            inner = peel_to_shape(src, (s_shape[0], s_shape[1], s_shape[3], s_shape[4]))
            if inner is not None:
                return inner, _int(e_shape[1])
        return E.squeeze(src, 2), _int(e_shape[1])
    return k_node, None


def _int(x: Any) -> int:
    from attnrw.patterns.graph import hint

    return hint(x)


def batch_numel_matches(a: tuple, b: tuple) -> bool:
    return same(numel(a), numel(b))


def dtype_of(node: Any) -> torch.dtype | None:
    t = tensor_val(node)
    return t.dtype if t is not None else None


def token_locations(q: Any, k: Any, rows: Any, cols: Any) -> tuple[Any, Any]:
    """The nodes the query axis of ``q`` and the key axis of ``k`` are read from, with where they lie.

    ``q`` and ``k`` are the canonical expressions, (…, S, D); the axis is
    followed through the expression (a transpose of pre-transposed keys, a
    reshape of folded heads) rather than guessed from sizes, which coincide
    when the head size equals the length.
    """
    return tokens.locate(q, -2, rows), tokens.locate(k, -2, cols)


def attended_axis(q: Any, k: Any, rows: Any, cols: Any, ctx: MatchContext) -> str:
    """What the scores' query and key axes are made of: ``"tokens"``, ``"features"`` or ``"unknown"``.

    ``"features"`` when either axis is provably a projection's output
    channels (channel attention); ``"tokens"`` when both are provably not.
    """
    answers: list[bool | None] = []
    for found in token_locations(q, k, rows, cols):
        axes = None if found is None else tokens.token_axes(*found)
        if not axes:
            answers.append(None)
            continue
        each = [feature_axis(found[0], a, ctx) for a in axes]
        answers.append(True if True in each else False if all(x is False for x in each) else None)
    if any(a is True for a in answers):
        return "features"
    return "tokens" if all(a is False for a in answers) else "unknown"


def aligned(q: Any, k: Any, rows: Any, cols: Any, ctx: MatchContext, causal: bool, axis: str) -> bool:
    """Queries and keys are one sequence, position for position, along the token axis.

    A causal site with square scores is aligned by its own definition: query
    i may see keys up to i, so query i and key i are one position (whatever
    tensors they came from). A bidirectional site needs the proof that query
    i and key i are position i of one tensor: the query and key axes, walked
    back through ops token-wise along them (:mod:`attnrw.patterns.tokens`:
    projections, 1×1 convolutions, norms, pointwise ops, broadcasts, views
    and permutes that move the axis), reach a common tensor at the same
    place. Neither holds when the attended axis is made of features.
    """
    if axis == "features" or not same(rows, cols):
        return False
    if causal:
        return True
    qloc, kloc = token_locations(q, k, rows, cols)
    if qloc is None or kloc is None:
        return False
    return bool(ctx.token_roots(*qloc) & ctx.token_roots(*kloc))
