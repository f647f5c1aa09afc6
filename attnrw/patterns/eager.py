"""Hand-written attention: softmax(Q·Kᵀ·scale + mask)·V spelled with aten products.

Anchors on a softmax over the last axis and checks the semantics around it,
whatever spelling produced it:

* the product: ``bmm`` (heads folded into the batch), ``matmul`` /
  ``einsum`` (both decompose to ``bmm`` with views), ``mm``, ``baddbmm``
  (``nn.MultiheadAttention`` with ``need_weights``), K transposed by
  ``transpose``/``permute`` or stored pre-transposed; einsum operands and
  results in any axis order, including scores computed as K·Qᵀ and
  transposed back and products whose batch (heads, batch) order differs
  from the scores' (the layout chain is composed, not read node by node);
* the scale: ``mul``/``div`` by a constant before or after the product, on
  either operand, or none (T5);
* masks and biases between the product and the softmax: ``add``/``sub`` of
  any tensor that does not depend on the scores (padding masks, causal masks,
  T5/Swin/ALiBi position biases), ``masked_fill``/``where`` with a large
  negative fill (boolean masks; DistilBERT, GPT-2), in any frame that keeps
  the query and key axes (Swin adds its mask in a 5-D view);
* attention-logit softcapping, ``c · tanh(a · Q·Kᵀ)`` before the masks
  (Gemma 2: ``tanh(s / cap) * cap``): the site's ``softcap`` is c, its scale
  a · c; nothing but factors may sit inside the tanh;
* casts around the softmax (upcast to float32 and back), eval-mode dropout;
* the product with values as P·V or, with channels-first values, Vᵀ·Pᵀ
  (timm's EfficientViT: ``v @ attn.transpose(-2, -1)``), the probabilities
  permuted and reshaped on the way in any order that composes to one of
  those (einsum's ``bnij,jbnd->ibnd`` in HF Funnel and XLNet);
* grouped-query attention through ``repeat_kv`` (expand + reshape).

The rewrite would be wrong, and is refused with a reason, when: the softmax
is over another axis; the probabilities are used elsewhere (returned as
weights) or pass through an active dropout; the product sums them over the
query axis (Pᵀ·V); the scale is a tensor that varies over queries or keys
(one per head or batch, as in Swin-v2's cosine attention, is folded into
the queries); a term
depends on the scores; the scores are reshaped across the query/key axes;
the product's batch or head axes are reordered after it with dynamic
sizes or around a product other than ``bmm``;
a fill value is not a large negative constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from attnrw.masking import MASKED_BELOW
from attnrw.patterns import expr as E
from attnrw.patterns import layout
from attnrw.patterns.context import MatchContext
from attnrw.patterns.graph import (
    DROPOUT,
    PRODUCTS,
    arg,
    aten,
    dtype_name,
    hint,
    is_cast,
    is_order_preserving,
    module_path,
    numel,
    real_users,
    same,
    same_shape,
    shape,
    tensor_val,
    val,
)
from attnrw.patterns.masks import canonical_mask, classify_mask
from attnrw.patterns.match import (
    Match,
    aligned,
    attended_axis,
    NoMatch,
    canonical_bh,
    from_canonical_bh,
    peel_repeat_kv,
    peel_to_shape,
    peel_transposed,
)
from attnrw.patterns.site import AttentionSite

_MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}


def _scalar(x: Any, ctx: MatchContext) -> float | None:
    """A Python number, or the value of a constant 0-dim tensor (never a parameter); None otherwise."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Node):
        t = tensor_val(x)
        if t is not None and t.dim() == 0 and ctx.is_constant(x):
            v = ctx.value(x)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                return float(v.item())
    return None


def _runtime_scalar(x: Any) -> bool:
    """A scalar known only at run time: a SymFloat (dynamo lifts float attributes under
    ``dynamic=True``) or a 0-dim tensor. It is folded into the queries, not baked in."""
    if not isinstance(x, Node):
        return False
    v = val(x)
    if isinstance(v, (torch.SymFloat, torch.SymInt)):
        return True
    return isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point()


@dataclass(frozen=True)
class _Behind:
    """What :func:`_product_behind_layout` found: the product, whether the scores are its transpose, the
    layout nodes between, and (if the chain reorders them) how the product's batch axes map to the scores'."""

    product: Node
    transposed: bool
    chain: set[Node]
    #: None: the batch axes are in order. Else ``(sizes, perm)``: the product's folded batch split into
    #: ``sizes`` (as the first view after it splits it), and the scores' batch axes are ``sizes[perm[i]]``.
    batch: tuple[tuple[int, ...], tuple[int, ...]] | None = None


def _product_behind_layout(node: Node, rows: Any, cols: Any, depth: int = 12) -> _Behind | None:
    """The product whose axes ``node`` (a permute/transpose) shows as scores.

    Walks back through layout ops only (views, permutes, transposes) to a
    product and composes the chain forward with :mod:`attnrw.patterns.layout`,
    from the first view after the product (which splits its folded batch the
    way the product's operands were folded). The scores' (query, key) axes
    must hold the product's matrix axes as they are or swapped
    (``transposed``: the product is K·Qᵀ, the scores its transpose, as
    ``einsum("bhqd,bhkd->bhkq")`` then ``permute(0, 1, 3, 2)`` writes them);
    their batch axes the product's batch axes in order, or reordered
    (``batch``; static sizes only). None if the chain is anything else, or
    the query or key axis has size 1 (then the two cannot be told apart).
    """
    chain: list[Node] = []
    cur: Any = node
    while isinstance(cur, Node) and cur.target not in PRODUCTS:
        if len(chain) == depth or not (cur.target in layout.AXIS_MOVES or is_order_preserving(cur) or is_cast(cur)):
            return None
        chain.append(cur)
        cur = cur.args[0]
    if not isinstance(cur, Node) or cur.target is aten.baddbmm.default or same(rows, 1) or same(cols, 1):
        return None
    ps, out = shape(cur), shape(node)
    if ps is None or out is None or len(ps) < 2 or len(out) < 2 or not same(numel(ps[:-2]), numel(out[:-2])):
        return None
    # The source the chain is composed from: the first view after the product when it only splits the
    # product's batch (and adds size-1 axes): that split is how the flat batch index reads; else the
    # product itself.
    first = chain[-1] if chain else None
    vs = shape(first) if first is not None and first.target not in layout.AXIS_MOVES else None
    nz = [i for i, d in enumerate(vs or ()) if not same(d, 1)]
    if vs is not None and len(nz) >= 2 and same(vs[nz[-2]], ps[-2]) and same(vs[nz[-1]], ps[-1]):
        src, steps, row_ax, col_ax, batch_ax = vs, chain[:-1], nz[-2], nz[-1], nz[:-2]
    else:
        src, steps = tuple(ps), chain
        row_ax, col_ax = len(src) - 2, len(src) - 1
        batch_ax = [i for i, d in enumerate(src[:-2]) if not same(d, 1)]
    groups = layout.source_groups(src)
    try:
        for n in reversed(steps):
            groups = layout.step(n, groups, src)
    except layout.Lost:
        return None
    if len(groups) < 2 or any(len(g) > 1 for g in groups[:-2]):
        return None
    matrix = (groups[-2], groups[-1])
    if matrix not in (((row_ax,), (col_ax,)), ((col_ax,), (row_ax,))):
        return None
    transposed = matrix == ((col_ax,), (row_ax,))
    held = layout.labels(groups[:-2])
    if sorted(held) != batch_ax:
        return None
    if list(held) == batch_ax:
        return _Behind(cur, transposed, set(chain))
    sizes = tuple(src[i] for i in batch_ax)
    if not all(isinstance(d, int) for d in sizes):
        return None
    return _Behind(cur, transposed, set(chain), (sizes, tuple(batch_ax.index(a) for a in held)))


def _reordered(x: Any, batch: tuple[tuple[int, ...], tuple[int, ...]], xb: tuple, tail: tuple) -> E.Expr:
    """``x``, an operand of the product with its batch folded in the product's order, as (*xb, *tail) in
    the scores' batch order (see :class:`_Behind`)."""
    sizes, perm = batch
    n = len(sizes)
    dims = [*sizes, *(d if isinstance(d, int) else E.SizeOf(x, i - len(tail)) for i, d in enumerate(tail))]
    moved = E.permute(E.reshape(x, dims), [*perm, n, n + 1])
    return E.reshape(moved, [*xb, *(E.SizeOf(moved, n + i) for i in range(len(tail)))])


def _moves_product_axes(node: Any, depth: int = 12) -> bool:
    """Whether ``node`` is a product moved by permutes and views (what :func:`_product_behind_layout` refused)."""
    for _ in range(depth):
        if not isinstance(node, Node):
            return False
        if node.target in PRODUCTS:
            return True
        if not (node.target in layout.AXIS_MOVES or is_order_preserving(node)):
            return False
        node = node.args[0]
    return False


def _reaches_product(node: Any, rows: Any, cols: Any, depth: int = 24) -> bool:
    """Whether ``node`` is scores: a product with (rows, cols) trailing dims, through score-chain ops."""
    if not isinstance(node, Node) or depth == 0:
        return False
    if node.target in layout.AXIS_MOVES and _product_behind_layout(node, rows, cols) is not None:
        return True
    if is_order_preserving(node) or is_cast(node):
        # Views may pass through frames with other trailing axes (einsum
        # unsqueezes and permutes size-1 axes); the row-major order is kept.
        return _reaches_product(node.args[0], rows, cols, depth - 1)
    s = shape(node)
    if s is None or len(s) < 2 or not (same(s[-2], rows) and same(s[-1], cols)):
        return False
    t = node.target
    if t in PRODUCTS:
        return True
    if t in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
        return any(_reaches_product(a, rows, cols, depth - 1) for a in node.args[:2])
    if t in _MASKED_FILL or t is aten.tanh.default:
        return _reaches_product(node.args[0], rows, cols, depth - 1)
    if t is aten.where.self:
        return any(_reaches_product(a, rows, cols, depth - 1) for a in node.args[1:3])
    return False


class _ScoreChain:
    """The walk from the softmax input back to the Q·Kᵀ product."""

    def __init__(self, ctx: MatchContext, rows: Any, cols: Any) -> None:
        self.ctx = ctx
        self.rows, self.cols = rows, cols
        self.scale = 1.0
        # Scale factors only known at run time, folded into q: 0-dim values
        # (frame None) and tensors constant over queries and keys (with the
        # frame of the scores they scale).
        self.runtime: list[tuple[Any, tuple | None]] = []
        # (term, frame shape, factor): term added to the scores in that frame,
        # multiplied by the scales applied after it.
        self.terms: list[tuple[Any, tuple, float]] = []
        self.interior: set[Node] = set()
        # The factor outside a softcap's tanh (``c · tanh(x)``), once the walk passed one;
        # self.scale then counts the factors inside it.
        self.softcap: float | None = None
        # The product found is K·Qᵀ and the scores its transpose (see _product_behind_layout).
        self.transposed = False
        # The product's batch axes reordered into the scores' (see _Behind.batch); None: in order.
        self.batch: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def walk(self, x: Node) -> Node:
        cur: Any = x
        while True:
            if not isinstance(cur, Node):
                raise NoMatch("the scores are not computed by the graph")
            s = shape(cur)
            if cur.target in PRODUCTS:
                if s is None or not (same(s[-2], self.rows) and same(s[-1], self.cols)):
                    raise NoMatch("the scores are reshaped across the query and key axes before the softmax")
                return cur
            if cur.target in layout.AXIS_MOVES:
                found = _product_behind_layout(cur, self.rows, self.cols)
                if found is not None:
                    self.transposed, self.batch = found.transposed, found.batch
                    self.interior |= found.chain
                    return found.product
            self.interior.add(cur)
            if is_order_preserving(cur) or is_cast(cur):
                cur = cur.args[0]
                continue
            if s is None or len(s) < 2 or not (same(s[-2], self.rows) and same(s[-1], self.cols)):
                raise NoMatch("a mask or bias is applied in a frame that mixes the query and key axes")
            cur = self._step(cur, s)

    def _pick(self, node: Node, candidates: list[Any]) -> tuple[Node, list[Any]]:
        score = [c for c in candidates if _reaches_product(c, self.rows, self.cols)]
        if not score:
            if any(_moves_product_axes(c) for c in candidates):
                raise NoMatch(f"{node.name}: the scores are a Q·Kᵀ product moved by permutes and views that do "
                              "not compose to its layout (or reorder its batch axes with dynamic sizes)")
            raise NoMatch(f"no Q·Kᵀ product found behind {node.name}")
        chosen = score[0]
        if not same_shape(shape(chosen), shape(node)):
            raise NoMatch(f"{node.name}: a mask or bias broadcasts the scores to a larger shape")
        return chosen, [c for c in candidates if c is not chosen]

    def _term(self, term: Any, frame: tuple) -> None:
        if self.softcap is not None:
            raise NoMatch("a mask or bias is added to the scores inside the tanh of a softcap")
        if isinstance(term, Node) and _reaches_product(term, self.rows, self.cols, depth=8):
            # A bias built from the scores themselves is not a mask we can pass in.
            raise NoMatch("a term added to the scores depends on the scores")
        for r, r_frame in self.runtime:
            if r_frame is not None and not same_shape(r_frame, frame):
                raise NoMatch("a mask is added in another frame than the tensor scale applied after it")
            term = E.mul(term, r)
        self.terms.append((term, frame, self.scale))

    def _check_tensor_scale(self, node: Node, other: Any, frame: tuple) -> None:
        """A tensor scale that can be folded into q: one value per head or batch (Swin-v2's cosine
        attention, ``exp(clamp(logit_scale))`` of shape (H, 1, 1); temperatures), constant over
        the query and key axes. One that varies over queries or keys would need a scale per score."""
        ts = shape(other)
        if not isinstance(other, Node) or ts is None:
            raise NoMatch(f"{node.name}: the scores are scaled by {other!r}, not a number or a tensor")
        if not all(same(d, 1) for d in ts[-2:]):
            raise NoMatch(f"{node.name}: the scores are scaled by a tensor that varies over the queries or keys")
        if tensor_val(other).dtype != tensor_val(node).dtype:
            raise NoMatch(f"{node.name}: the scores are scaled by a tensor of another dtype")

    def _step(self, node: Node, frame: tuple) -> Any:
        t = node.target
        if t in (aten.add.Tensor, aten.sub.Tensor):
            a, b = node.args[:2]
            alpha = node.kwargs.get("alpha", 1)
            score, (other,) = self._pick(node, [a, b])
            if t is aten.sub.Tensor and score is b:
                raise NoMatch("the scores are negated before the softmax")
            sign = -1.0 if t is aten.sub.Tensor else 1.0
            if isinstance(other, Node):
                term = other if sign * alpha == 1 else E.mul(other, sign * alpha)
                self._term(term, frame)
            elif not isinstance(other, (int, float)):
                raise NoMatch(f"{node.name}: unsupported operand {other!r}")
            elif other != 0 and self.softcap is not None:
                raise NoMatch(f"{node.name}: a constant is added to the scores inside the tanh of a softcap")
            # A constant added to every score (outside a softcap) cancels in the softmax.
            return score
        if t in (aten.mul.Tensor, aten.div.Tensor):
            a, b = node.args[:2]
            score, (other,) = self._pick(node, [a, b])
            if t is aten.div.Tensor and score is not a:
                raise NoMatch(f"{node.name}: a constant is divided by the scores")
            c = _scalar(other, self.ctx)
            if c is None:
                per_site = _runtime_scalar(other)
                if not per_site:
                    self._check_tensor_scale(node, other, frame)
                factor = other if t is aten.mul.Tensor else E.Expr(aten.reciprocal.default, (other,))
                self.runtime.append((factor, None if per_site else frame))
                return score
            if t is aten.div.Tensor:
                c = 1.0 / c
            if not (c > 0 and math.isfinite(c)):
                raise NoMatch(f"{node.name}: scale {c} is not a positive finite number")
            self.scale *= c
            return score
        if t in _MASKED_FILL:
            score, mask, value = node.args[:3]
            v = _scalar(value, self.ctx)
            if v is None or v > MASKED_BELOW:
                raise NoMatch(f"{node.name}: masked_fill value {value!r} is not a large negative constant")
            self._term(E.where(mask, v, 0.0, tensor_val(node).dtype), frame)
            return score
        if t is aten.where.self:
            cond, a, b = node.args[:3]
            score, (other,) = self._pick(node, [a, b])
            v = _scalar(other, self.ctx)
            if v is None or v > MASKED_BELOW:
                raise NoMatch(f"{node.name}: where() fill {other!r} is not a large negative constant")
            dt = tensor_val(node).dtype
            self._term(E.where(cond, 0.0, v, dt) if score is a else E.where(cond, v, 0.0, dt), frame)
            return score
        if t is aten.tanh.default:
            return self._softcap(node)
        name = getattr(t, "__name__", str(t))
        raise NoMatch(f"the scores pass through {name} between the product and the softmax")

    def _softcap(self, node: Node) -> Any:
        """``c · tanh(x)`` on the scores: a softcap of ``c``; the factors inside the tanh make the scale.

        ``c · tanh(a · qk) = cap · tanh(scale · qk / cap)`` with cap = c and
        scale = a · c (Gemma 2 writes ``tanh(s / cap) * cap``). The factor
        outside must be a number: a tensor there cannot be folded into q.
        """
        if self.softcap is not None:
            raise NoMatch(f"{node.name}: the scores pass through tanh twice (a softcap of a softcap)")
        if self.runtime:
            raise NoMatch(f"{node.name}: the tanh of a softcap is scaled by a tensor, not a number")
        self.softcap = self.scale
        self.scale = 1.0
        return node.args[0]


def _prescale(node: Any, ctx: MatchContext) -> tuple[Any, float]:
    """Strip a constant ``mul``/``div`` directly on a query or key tensor (``q * d**-0.25``)."""
    factor = 1.0
    while isinstance(node, Node) and node.target in (aten.mul.Tensor, aten.div.Tensor):
        a, b = node.args[:2]
        if not isinstance(a, Node):
            a, b = b, a
        c = _scalar(b, ctx)
        if c is None or not isinstance(a, Node) or c <= 0:
            break
        factor *= (1.0 / c) if node.target is aten.div.Tensor else c
        node = a
    return node, factor


_LAYOUT = {aten.permute.default, aten.transpose.int, aten.expand.default, aten.view.default,
           aten._unsafe_view.default, aten.reshape.default, aten.clone.default, aten.unsqueeze.default,
           aten.select.int, aten.slice.Tensor, aten.squeeze.dim}


def _upstream_scale(x: Any, ctx: MatchContext) -> float:
    """A constant factor applied to a query/key tensor above layout-only ops (for reporting)."""
    nodes = E.nodes_in(x)
    node = nodes[0] if nodes else None
    for _ in range(24):
        if not isinstance(node, Node):
            return 1.0
        if node.target in (aten.mul.Tensor, aten.div.Tensor):
            _, factor = _prescale(node, ctx)
            return factor
        if node.target not in _LAYOUT:
            return 1.0
        node = node.args[0]
    return 1.0


def _as_batched(node: Any, target: tuple, what: str) -> Any:
    """``node`` (same elements in row-major order) presented with shape ``target``."""
    found = peel_to_shape(node, target)
    if found is not None:
        return found
    # A dynamic size is read off an axis of ``node`` that has it; one left
    # over is inferred (-1), since the element count is the same.
    have = shape(node) or ()
    dims: list[Any] = []
    for d in target:
        j = None if isinstance(d, int) else next((j for j, h in enumerate(have) if same(h, d)), None)
        dims.append(d if isinstance(d, int) else -1 if j is None else E.SizeOf(node, j))
    if dims.count(-1) > 1 or not same(numel(have), numel(target)):
        raise NoMatch(f"cannot express the {what} layout with dynamic sizes")
    return E.reshape(node, dims)


def _untranspose(kt: Any) -> Any:
    """(…, a, b) -> (…, b, a): reuse the untransposed tensor when ``kt`` is a transpose of it."""
    if isinstance(kt, Node):
        rank = len(shape(kt) or ())
        if kt.target is aten.transpose.int:
            dims = {kt.args[1] % rank, kt.args[2] % rank}
            if dims == {rank - 2, rank - 1}:
                return kt.args[0]
        if kt.target is aten.permute.default:
            perm = [p % rank for p in kt.args[1]]
            if perm == list(range(rank - 2)) + [rank - 1, rank - 2]:
                return kt.args[0]
        s = shape(kt)
        found = None if s is None or len(s) < 2 else peel_transposed(kt, (*s[:-2], s[-1], s[-2]))
        if found is not None:
            return found
    return E.transpose(kt, -1, -2)


def _product_with_values(sm: Node, xs: tuple) -> tuple[Node, bool, set[Node], tuple[int, ...] | None]:
    """Follow the probabilities to their product with values: ``(product, P is the right operand, chain)``.

    The chain may permute, transpose and reshape the probabilities in any
    order (:mod:`attnrw.patterns.layout` composes it); what counts is where
    their axes end up at the product. P·V needs P as the left operand with
    queries × keys as its matrix axes; V·Pᵀ (channels-first values, timm's
    EfficientViT) needs P as the right operand transposed, keys × queries.
    Either way the batch axes must hold the scores' batch axes, in order
    or, with static sizes, reordered: the last item is then the scores' batch
    axes (those of size > 1) in the order the product holds them (einsum
    writing ``bhqk,bhkd->hbqd``), else None.
    """
    sizes = tuple(xs)
    groups = layout.source_groups(xs)
    rows_g, cols_g, batch = groups[-2], groups[-1], layout.labels(groups[:-2])
    chain: set[Node] = set()
    cur = sm
    while True:
        users = real_users(cur)
        if len(users) != 1:
            raise NoMatch(
                "the attention probabilities are also used elsewhere (e.g. returned as attention weights)"
                if users
                else "the softmax output is unused"
            )
        u = users[0]
        if u.target in PRODUCTS and u.target is not aten.baddbmm.default:
            break
        if u.target in DROPOUT or (u.target is aten.native_dropout.default):
            if not (is_order_preserving(u)):
                raise NoMatch("dropout is active on the attention probabilities (training mode)")
        try:
            groups = layout.step(u, groups, sizes)
        except layout.Lost as e:
            name = getattr(u.target, "__name__", str(u.target))
            raise NoMatch(str(e) or f"the probabilities flow into {name} instead of a product with values") from None
        chain.add(u)
        cur = u
    if u.args[0] is cur and u.args[1] is cur:
        raise NoMatch("the probabilities are multiplied by themselves")
    p_right = u.args[0] is not cur
    if len(groups) < 2:
        raise NoMatch("the probabilities are reshaped across the query and key axes")
    matrix = (groups[-2], groups[-1])
    want = (cols_g, rows_g) if p_right else (rows_g, cols_g)
    if matrix != want:
        if matrix == (want[1], want[0]):
            raise NoMatch("the product sums the probabilities over the query axis, not the key axis")
        contracted = layout.labels((matrix[0] if p_right else matrix[1],))
        if contracted and set(contracted) <= set(batch):
            raise NoMatch("the probabilities are mixed across heads or batch entries before the product with "
                          "values (talking heads): each output would depend on other heads' attention")
        raise NoMatch("the probabilities are reshaped across the query and key axes")
    held = layout.labels(groups[:-2])
    if held == batch:
        return u, p_right, chain, None
    if sorted(held) != sorted(batch) or not all(isinstance(xs[a], int) for a in held):
        raise NoMatch("the probabilities' batch axes are reordered before the product with values")
    return u, p_right, chain, held


def match_softmax(sm: Node, ctx: MatchContext) -> Match:
    """Match the attention around one softmax node; raises :class:`NoMatch` with the reason."""
    x = sm.args[0]
    xs = shape(x)
    if xs is None or len(xs) < 2:
        raise NoMatch("softmax over a tensor of rank < 2")
    rank = len(xs)
    dim = arg(sm, 1, "dim") % rank
    if dim != rank - 1:
        raise NoMatch(f"softmax over axis {dim}, not the last (key) axis")
    xb, rows, cols = tuple(xs[:-2]), xs[-2], xs[-1]
    interior: set[Node] = {sm}

    # Probabilities -> the product with V: P·V, or Vᵀ·Pᵀ = (P·V)ᵀ.
    pv, p_right, chain_nodes, pv_order = _product_with_values(sm, xs)
    interior |= chain_nodes
    vm = pv.args[0] if p_right else pv.args[1]
    pm_shape, vm_shape = shape(pv.args[1] if p_right else pv.args[0]), shape(vm)
    if pm_shape is None or vm_shape is None or len(pm_shape) != len(vm_shape):
        raise NoMatch("probabilities and values have unexpected ranks")
    v_keys, v_dim = (vm_shape[-1], vm_shape[-2]) if p_right else (vm_shape[-2], vm_shape[-1])
    if not same(v_keys, cols):
        raise NoMatch("the product with values does not contract the key axis")
    if not same(numel(pm_shape[:-2]), numel(xb)) or not same_shape(pm_shape[:-2], vm_shape[:-2]):
        raise NoMatch("the product with values does not keep the batch of the scores")
    interior.add(pv)

    # Scores -> the Q·Kᵀ product.
    chain = _ScoreChain(ctx, rows, cols)
    qk = chain.walk(x)
    for term, _, _ in chain.terms:
        if any(ctx.depends_on(n, qk) for n in E.nodes_in(term)):
            raise NoMatch("a term added to the scores depends on the scores")
    for factor, frame in chain.runtime:
        if any(ctx.depends_on(n, qk) for n in E.nodes_in(factor)):
            raise NoMatch("the scores are scaled by a tensor that depends on the scores")
        if frame is not None and not same_shape(frame[:-2], xb):
            raise NoMatch("the scores are scaled by a tensor in another frame than the softmax's")
    interior |= chain.interior | {qk}
    softcap = chain.softcap or 0.0
    if softcap and qk.target is aten.baddbmm.default and qk.args[0] is not None and qk.kwargs.get("beta", 1) != 0:
        raise NoMatch("a bias is added to the scores inside the tanh of a softcap (baddbmm)")
    # With a softcap the op computes cap·tanh(scale·qk/cap): its scale is the factors inside times cap.
    scale = chain.scale * (softcap or 1.0)
    terms = list(chain.terms)
    if qk.target is aten.baddbmm.default:
        bias, a_node, b_node = qk.args[:3]
        beta, alpha = qk.kwargs.get("beta", 1), qk.kwargs.get("alpha", 1)
        if isinstance(bias, Node) and beta != 0:
            terms.append((bias if beta == 1 else E.mul(bias, beta), shape(qk), scale))
        scale *= alpha
    else:
        a_node, b_node = qk.args[:2]
    if chain.transposed:
        # Q·Kᵀ = (K·Qᵀ)ᵀ: the product's left operand holds the keys, its right one Qᵀ.
        a_node, b_node = b_node, a_node
    a_shape, b_shape = shape(a_node), shape(b_node)
    if a_shape is None or b_shape is None or len(a_shape) != len(b_shape):
        raise NoMatch("the Q·Kᵀ product broadcasts its operands")
    if not same_shape(a_shape[:-2], b_shape[:-2]) or not same(numel(a_shape[:-2]), numel(xb)):
        raise NoMatch("the Q·Kᵀ product does not keep the batch of the scores")
    head_dim = a_shape[-2] if chain.transposed else a_shape[-1]

    # Canonical q, k, v of shape (*Xb, S, D).
    if chain.batch is not None and qk.target is not aten.bmm.default:
        raise NoMatch("the scores' batch axes are reordered after a product that is not a bmm")
    if chain.batch is not None and chain.transposed:
        q = _untranspose(_reordered(a_node, chain.batch, xb, (head_dim, rows)))
        k = _reordered(b_node, chain.batch, xb, (cols, head_dim))
    elif chain.batch is not None:
        q = _reordered(a_node, chain.batch, xb, (rows, head_dim))
        k = _untranspose(_reordered(b_node, chain.batch, xb, (head_dim, cols)))
    elif chain.transposed:
        q = _untranspose(_as_batched(a_node, (*xb, head_dim, rows), "query"))
        k = _as_batched(b_node, (*xb, cols, head_dim), "key")
    else:
        q = _as_batched(a_node, (*xb, rows, head_dim), "query")
        k = _untranspose(_as_batched(b_node, (*xb, head_dim, cols), "key"))
    if isinstance(k, Node):
        k = peel_to_shape(k, (*xb, cols, head_dim)) or k
    if pv_order is not None:
        # The product with values holds the batch axes in pv_order: v comes in that order.
        in_order = tuple(sorted(pv_order))
        to_scores = ((tuple(xs[a] for a in pv_order), tuple(pv_order.index(a) for a in in_order)))
        v = (_untranspose(_reordered(vm, to_scores, xb, (v_dim, cols))) if p_right
             else _reordered(vm, to_scores, xb, (cols, v_dim)))
    elif p_right:
        v = peel_transposed(vm, (*xb, cols, v_dim))
        if v is None:
            v = _untranspose(_as_batched(vm, (*xb, v_dim, cols), "value"))
    else:
        v = _as_batched(vm, (*xb, cols, v_dim), "value")
    if isinstance(v, Node):
        v = peel_to_shape(v, (*xb, cols, v_dim)) or v
    q, q_pre = _prescale(q, ctx)
    k, k_pre = _prescale(k, ctx)
    if isinstance(q, Node):
        q = peel_to_shape(q, (*xb, rows, head_dim)) or q
    if isinstance(k, Node):
        k = peel_to_shape(k, (*xb, cols, head_dim)) or k
    scale *= q_pre * k_pre
    # A constant applied further up (before the heads are split) stays in the
    # graph; count it in the reported scale so sites compare across spellings.
    report_scale = scale * _upstream_scale(q, ctx) * _upstream_scale(k, ctx)
    for factor, frame in chain.runtime:
        # (q·s)·Kᵀ = s·(Q·Kᵀ) when s is constant over queries and keys: the
        # factor stays a value computed at run time, the op gets scale 1 for it.
        q = E.mul(q, factor)
        if frame is None:
            rv = E.evaluate(factor, lambda n: ctx.value(n) if ctx.value(n) is not None else val(n))
            report_scale *= float(rv)

    dtypes = {tensor_val(n).dtype for n in (a_node, b_node, vm) if tensor_val(n) is not None}
    if len(dtypes) > 1:
        raise NoMatch("queries, keys and values have different dtypes")
    out_dtype = tensor_val(pv).dtype

    heads = xb[-1] if len(xb) >= 1 else 1
    kv_heads = None
    if len(xb) == 2:
        k_src, kv_k = peel_repeat_kv(k, heads)
        v_src, kv_v = peel_repeat_kv(v, heads)
        if kv_k is not None and kv_k == kv_v:
            k, v, kv_heads = k_src, v_src, kv_k

    mask = canonical_mask(terms, xs, xb)
    mask_info = classify_mask(mask, ctx, rows, cols, is_causal=False, batch_rank=len(xb))

    qc, kc, vc = canonical_bh(q, len(xb)), canonical_bh(k, len(xb)), canonical_bh(v, len(xb))
    out = from_canonical_bh(E.RESULT, xb, q)
    if p_right:
        out = E.transpose(out, -1, -2)
    if pv_order is not None:
        # Back to the batch order of the product with values.
        to_product = (tuple(xs[a] for a in in_order), tuple(in_order.index(a) for a in pv_order))
        out = _reordered(out, to_product, tuple(vm_shape[:-2]), tuple(shape(pv)[-2:]))
    elif not same_shape(pm_shape[:-2], xb):
        # Back to the batch axes of the product with values, read off the
        # values operand (which has them) where they are dynamic.
        nb = [d if isinstance(d, int) else E.SizeOf(vm, i) for i, d in enumerate(vm_shape[:-2])]
        out = E.reshape(out, [*nb, E.SizeOf(out, -2), E.SizeOf(out, -1)])
    if out_dtype != dtypes.pop():
        out = E.cast(out, out_dtype)

    qv = tensor_val(a_node)
    axis = attended_axis(q, k, rows, cols, ctx)
    site = AttentionSite(
        module_path=module_path(sm),
        source="eager",
        num_heads=hint(heads) if len(xb) >= 1 else 1,
        num_kv_heads=kv_heads if kv_heads is not None else (hint(heads) if len(xb) >= 1 else 1),
        q_len=hint(rows),
        kv_len=hint(cols),
        head_dim=hint(head_dim),
        v_head_dim=hint(v_dim),
        scale=float(report_scale),
        causal=mask_info.causal,
        mask=mask_info.kind,
        dropout_p=0.0,
        dtype=dtype_name(qv.dtype),
        batch=hint(numel(xb[:-1])) if len(xb) >= 1 else 1,
        self_attention=aligned(q, k, rows, cols, ctx, mask_info.causal, axis),
        attended_axis=axis,
        node=sm.name,
        softcap=float(softcap),
    )
    return Match(
        site=site,
        q=qc,
        k=kc,
        v=vc,
        mask=mask_info.mask,
        is_causal=mask_info.use_causal_flag,
        scale=float(scale),
        replace=pv,
        output=out,
        interior=interior,
        anchor=sm,
    )


__all__ = ["match_softmax"]
