"""Where a tensor's token axis comes from: the proof that queries and keys are one sequence.

A query tensor's row ``i`` is token ``i`` of some earlier tensor ``X`` when
every op between them is *token-wise along the tokens*: the value at
position ``i`` of the output is computed from position ``i`` of its inputs
(and from nothing that varies over the tokens otherwise), and the index is
carried over unchanged. Walking back from q's query axis and from k's key
axis through such ops, tracking where the tokens go, a common
``(X, location)`` reached from both proves that query ``i`` and key ``i``
are position ``i`` of ``X``: one aligned sequence.

Token-wise along the tokens (the step rules of :func:`token_inputs`):

* pointwise ops and broadcasts: an input that is not of full size on the
  token axes is the same for every position, or varies over them in another
  pattern, and is not followed;
* layout ops: views keep the flat order (the location does not change),
  permutes and transposes move the token axes, selections, splits, slices
  from 0 and concatenations along other axes;
* reductions, normalisations and softmaxes over other axes;
* projections that contract another axis with a weight: ``mm``/``addmm``/
  ``bmm``/``linear`` over the features, and convolutions whose kernel is 1
  with stride 1 and no padding along every token axis (1×1 and grouped 1×1
  convs, channels-first (N, C, W) and (N, C, H, W) layouts included).

Anything else ends the walk there: a convolution of kernel > 1, stride or
padding along a token axis (it mixes positions or shifts them), a product
of two activations over the tokens, gathers, slices from another start.
Ending early is safe (the node itself becomes a root, which only a tensor
built from that very node at the same place shares); passing through an op
that is not token-wise would not be, so when a rule is unsure it ends the
walk. Sizes are compared as sympy expressions over the size symbols, so a
divisibility is proved for every length the graph admits, never read off
the example sizes.

An input that depends only on parameters, buffers and constants is not
followed: a position table added to q and to k of two other sequences
(cross-attention) does not make them one.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import sympy
import torch
from torch.fx import Node

from attnrw.patterns import expr as E
from attnrw.patterns.graph import DROPOUT, aten, is_cast, is_eval_dropout, is_order_preserving, shape


class Loc(NamedTuple):
    """Where the tokens lie in a tensor, in terms of its row-major (flat) element index.

    Token ``i`` (of ``size``) is at flat indices ``o·size·stride + i·stride + j``
    for every ``o`` and ``j < stride``: the tokens are one mixed-radix digit
    of the flat index. A view keeps it as it is; on the tensor's axes it is
    a run of consecutive axes (:func:`cover`), e.g. the last axis of
    (B, S, C)ᵀ, the folded B·S of a (B·S, C) projection input, or H and W of
    an (N, C, H, W) feature map flattened into N tokens.
    """

    stride: Any  # sympy expression
    size: Any  # sympy expression


Step = list[tuple[Node, Loc]] | None


def sym(d: Any) -> Any:
    """A dimension (int or SymInt) as a sympy expression."""
    if isinstance(d, sympy.Basic):
        return d
    if isinstance(d, torch.SymInt):
        return d.node.expr
    return sympy.Integer(int(d))


def _dims(node: Any) -> list | None:
    s = shape(node)
    return None if s is None else [sym(d) for d in s]


def _quotient(b: Any, a: Any) -> Any:
    """``b / a`` when ``a`` provably divides ``b`` for every value of the size symbols, else None."""
    q = b / a
    return q if q.is_integer is True and q.is_positive is True else None


def _suffix(dims: list) -> list:
    """``prod(dims[b+1:])`` for every axis ``b``."""
    out, acc = [], sympy.Integer(1)
    for d in reversed(dims):
        out.append(acc)
        acc = acc * d
    return out[::-1]


def at_axis(dims: list, axis: int, size: Any) -> Loc:
    """The location of a plain token axis of a tensor of ``dims``."""
    return Loc(_suffix(dims)[axis % len(dims)], sym(size))


def cover(dims: list, loc: Loc) -> tuple[list[int], Any] | None:
    """The axes the tokens run over (outermost first, size-1 axes left out) and the factor inside the last.

    Both ends of the run must fall on the axes' mixed radix: the stride
    inside one axis ``b`` (``prod(dims[b+1:])`` divides it, it divides
    ``prod(dims[b:])``), and so the top ``stride·size``. None otherwise
    (the tokens are not one digit of this shape: a view split them).
    """
    if loc.size == 1:
        return None
    suffix = _suffix(dims)

    def boundary(x: Any, low: bool) -> int | None:
        for b in reversed(range(len(dims))):
            if dims[b] == 1:
                continue
            inside = _quotient(x, suffix[b])
            if inside is None or _quotient(suffix[b] * dims[b], x) is None:
                continue
            # The low end starts a piece of this axis unless it is its very top;
            # the high end closes one unless it is its very bottom.
            if (low and inside != dims[b]) or (not low and inside != 1):
                return b
        return None

    lo, hi = boundary(loc.stride, True), boundary(loc.stride * loc.size, False)
    if lo is None or hi is None or hi > lo:
        return None
    axes = [b for b in range(hi, lo + 1) if dims[b] != 1]
    return axes, loc.stride / suffix[lo]


def place(dims: list, axes: list[int], inner: Any, sizes: list, size: Any) -> Loc | None:
    """The location of tokens running over ``axes`` of ``dims`` (sizes ``sizes``), ``inner`` inside the last.

    The axes must be in order and consecutive but for size-1 axes, and
    of the same sizes as where they came from.
    """
    if not axes or any(b < 0 or b >= len(dims) for b in axes):
        return None
    if axes != sorted(axes) or len(set(axes)) != len(axes):
        return None
    between = [b for b in range(axes[0], axes[-1] + 1) if dims[b] != 1]
    if between != axes or any(dims[b] != s for b, s in zip(axes, sizes)):
        return None
    return Loc(inner * _suffix(dims)[axes[-1]], size)


def _moved(node_dims: list, loc: Loc, ins: list, mapping: Callable[[int], int | None]) -> Loc | None:
    """The location in an input whose axis ``mapping(b)`` holds output axis ``b`` (None: not there)."""
    c = cover(node_dims, loc)
    if c is None:
        return None
    axes, inner = c
    mapped = [mapping(b) for b in axes]
    if any(m is None for m in mapped):
        return None
    return place(ins, mapped, inner, [node_dims[b] for b in axes], loc.size)


# -- the step rules ------------------------------------------------------------------

_POINTWISE_EXTRA = {
    aten.masked_fill.Tensor, aten._to_copy.default, aten.lift_fresh_copy.default, aten.alias.default,
    aten.detach.default, aten.clone.default, aten.contiguous.default,
}
_REDUCTIONS = {  # op: (index of dims, index of keepdim; None: keyword only)
    aten.sum.dim_IntList: (1, 2),
    aten.mean.dim: (1, 2),
    aten.amax.default: (1, 2),
    aten.amin.default: (1, 2),
    aten.var.correction: (1, None),
    aten.std.correction: (1, None),
    aten.linalg_vector_norm.default: (2, 3),
    aten.any.dims: (1, 2),
}
_ALONG_DIM = {aten._softmax.default, aten._log_softmax.default, aten.softmax.int, aten.cumsum.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_LAYER_NORMS = {aten.native_layer_norm.default, aten._fused_rms_norm.default}
_CONVS = {aten.convolution.default, aten._convolution.default}


def _kw(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def token_inputs(node: Node, loc: Loc, is_static: Callable[[Node], bool]) -> Step:
    """The inputs of ``node`` that hold its tokens at ``loc``, each with where they lie in it.

    ``None``: the walk ends here (the op is not token-wise along them, or
    not known to be). ``[]``: no input carries them (a broadcast of
    something constant over the tokens).
    """
    if node.op != "call_function":
        return None
    t = node.target
    try:
        if t is operator.getitem:
            return _getitem(node, loc, is_static)
        out = _dims(node)
        if out is None:
            return None
        x = node.args[0] if node.args else None
        rank = len(out)
        if t is aten.permute.default:
            perm = [p % rank for p in node.args[1]]
            return _follow(x, _moved(out, loc, _dims(x), lambda b: perm[b]), is_static)
        if t is aten.transpose.int:
            i, j = node.args[1] % rank, node.args[2] % rank
            return _follow(x, _moved(out, loc, _dims(x), lambda b: j if b == i else i if b == j else b), is_static)
        if t is aten.t.default:
            return _follow(x, _moved(out, loc, _dims(x), lambda b: rank - 1 - b), is_static)
        if t is aten.expand.default:
            return _broadcast(out, [x], loc, is_static)
        if t is aten.select.int:
            d = node.args[1] % (rank + 1)
            return _follow(x, _moved(out, loc, _dims(x), lambda b: b + (b >= d)), is_static)
        if t is aten.slice.Tensor:
            return _slice(node, out, loc, is_static)
        if t is aten.cat.default:
            d = _kw(node, 1, "dim", 0) % rank
            c = cover(out, loc)
            if c is None or d in c[0]:
                return None
            res: list[tuple[Node, Loc]] = []
            for part in node.args[0]:
                if isinstance(part, Node) and not is_static(part):
                    new = _moved(out, loc, _dims(part), lambda b: b)
                    if new is None:
                        return None
                    res.append((part, new))
            return res
        if t in DROPOUT:
            return _follow(x, loc, is_static) if is_eval_dropout(node) else None
        if is_order_preserving(node):
            return _follow(x, loc, is_static)  # the same elements in the same flat order
        if (hasattr(t, "tags") and torch.Tag.pointwise in t.tags) or t in _POINTWISE_EXTRA or is_cast(node):
            return _broadcast(out, node.all_input_nodes, loc, is_static)
        if t in _REDUCTIONS:
            di, ki = _REDUCTIONS[t]
            keep = _kw(node, ki, "keepdim", False) if ki is not None else node.kwargs.get("keepdim", False)
            return _reduce(x, out, _kw(node, di, "dim"), bool(keep), loc, is_static)
        if t in _ALONG_DIM:
            c = cover(out, loc)
            return None if c is None or node.args[1] % rank in c[0] else _follow(x, loc, is_static)
        if t in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            return _product(node, out, loc, is_static)
        if t is aten.linear.default:
            w = node.args[1]
            if not isinstance(w, Node) or not is_static(w):
                return None
            return _follow(x, _moved(out, loc, _dims(x), lambda b: None if b == rank - 1 else b), is_static)
        if t in _CONVS:
            return _convolution(node, out, loc, is_static)
    except (IndexError, TypeError, AttributeError):  # arguments spelled in a way the rule does not expect
        return None
    return None


def _follow(x: Any, loc: Loc | None, is_static: Callable[[Node], bool]) -> Step:
    if loc is None or not isinstance(x, Node):
        return None
    return [] if is_static(x) else [(x, loc)]


def _broadcast(out: list, inputs: list, loc: Loc, is_static: Callable[[Node], bool]) -> Step:
    """Inputs broadcast to ``out`` (right-aligned): those of full size on every token axis carry them.

    One of size 1 there (or without those axes) is the same for every
    position; one that varies over only some of the token axes does not
    carry the token index either. Neither is followed.
    """
    c = cover(out, loc)
    if c is None:
        return None
    axes, inner = c
    res: list[tuple[Node, Loc]] = []
    for x in inputs:
        if not isinstance(x, Node) or shape(x) is None or is_static(x):
            continue
        ins = _dims(x)
        shift = len(out) - len(ins)
        if all(b - shift >= 0 and ins[b - shift] == out[b] for b in axes):
            new = place(ins, [b - shift for b in axes], inner, [out[b] for b in axes], loc.size)
            if new is None:
                return None
            res.append((x, new))
    return res


def _slice(node: Node, out: list, loc: Loc, is_static: Callable[[Node], bool]) -> Step:
    x = node.args[0]
    ins = _dims(x)
    d = _kw(node, 1, "dim", 0) % len(out)
    c = cover(out, loc)
    if c is None or ins is None:
        return None
    axes, inner = c
    if d not in axes:
        return _follow(x, place(ins, axes, inner, [out[b] for b in axes], loc.size), is_static)
    begin, step = _kw(node, 2, "start", None), _kw(node, 4, "step", 1)
    # From position 0 with step 1, token i stays token i when the tokens are the whole axis.
    if begin not in (0, None) or step != 1 or axes != [d] or inner != 1 or loc.size != out[d]:
        return None
    return _follow(x, place(ins, [d], sympy.Integer(1), [ins[d]], ins[d]), is_static)


def _reduce(x: Any, out: list, dims: Any, keepdim: bool, loc: Loc, is_static: Callable[[Node], bool]) -> Step:
    ins = _dims(x)
    if ins is None or dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        return None  # an empty list reduces over every axis
    reduced = {d % len(ins) for d in dims}
    kept = list(range(len(ins))) if keepdim else [i for i in range(len(ins)) if i not in reduced]
    return _follow(x, _moved(out, loc, ins, lambda b: None if kept[b] in reduced else kept[b]), is_static)


def _getitem(node: Node, loc: Loc, is_static: Callable[[Node], bool]) -> Step:
    src, idx = node.args[0], node.args[1]
    out = _dims(node)
    if not isinstance(src, Node) or src.op != "call_function" or out is None:
        return None
    t = src.target
    x = src.args[0] if src.args else None
    ins = _dims(x)
    if ins is None:
        return None
    if t in _SPLITS:
        d = _kw(src, 2, "dim", 0) % len(ins)
        return _follow(x, _moved(out, loc, ins, lambda b: None if b == d else b), is_static)
    if t is aten.unbind.int:
        d = _kw(src, 1, "dim", 0) % len(ins)
        return _follow(x, _moved(out, loc, ins, lambda b: b + (b >= d)), is_static)
    if t is aten.native_dropout.default:
        return _follow(x, loc, is_static) if idx == 0 and is_eval_dropout(src) else None
    if t in _LAYER_NORMS and idx == 0:
        first = len(ins) - len(src.args[1])
        return _follow(x, _moved(out, loc, ins, lambda b: None if b >= first else b), is_static)
    if t is aten._native_batch_norm_legit_no_training.default and idx == 0:
        return _follow(x, loc, is_static)  # eval batch norm: one affine map per channel, pointwise
    if t is aten.var_mean.correction:
        return _reduce(x, out, _kw(src, 1, "dim"), bool(src.kwargs.get("keepdim", False)), loc, is_static)
    return None


def _product(node: Node, out: list, loc: Loc, is_static: Callable[[Node], bool]) -> Step:
    """``mm``/``addmm``/``bmm``: output axes that are not contracted come from one operand.

    (…, M, N) = (…, M, K)·(…, K, N): tokens on M come from the activations
    times a static weight, on N from a static weight times the activations,
    on the batch axis of ``bmm`` from both (one product per batch entry).
    """
    t = node.target
    x, w = (node.args[1], node.args[2]) if t is aten.addmm.default else (node.args[0], node.args[1])
    if not (isinstance(x, Node) and isinstance(w, Node)):
        return None
    c = cover(out, loc)
    if c is None:
        return None
    axes, rank = c[0], len(out)
    if rank == 3 and axes == [0]:
        res = [(n, _moved(out, loc, _dims(n), lambda b: b)) for n in (x, w) if not is_static(n)]
        return None if any(new is None for _, new in res) else res
    if rank - 1 not in axes and is_static(w) and not is_static(x):
        return _follow(x, _moved(out, loc, _dims(x), lambda b: b), is_static)
    if rank - 2 not in axes and is_static(x) and not is_static(w):
        return _follow(w, _moved(out, loc, _dims(w), lambda b: b), is_static)
    return None


def _convolution(node: Node, out: list, loc: Loc, is_static: Callable[[Node], bool]) -> Step:
    """``convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)``.

    Along the batch axis a convolution is per sample. Along a spatial axis
    it is token-wise only with kernel 1, stride 1 and no padding there
    (dilation does not matter for kernel 1; groups only split channels).
    The channel axis is mixed by the kernel.
    """
    x, w = node.args[0], node.args[1]
    stride, padding, transposed = node.args[3], node.args[4], node.args[6]
    ws, ins, c = _dims(w), _dims(x), cover(out, loc)
    if not isinstance(w, Node) or not is_static(w) or transposed or c is None or ws is None or ins is None:
        return None
    axes = c[0]
    if 1 in axes or len(ws) != len(out) or len(ins) != len(out):
        return None

    def at(v: Any, d: int) -> Any:
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return v[d] if len(v) > d else v[-1]

    for a in axes:
        if a == 0:
            continue
        if ws[a] != 1 or at(stride, a - 2) != 1 or at(padding, a - 2) != 0 or ins[a] != out[a]:
            return None
    return _follow(x, _moved(out, loc, ins, lambda b: b), is_static)


# -- from the canonical q and k expressions to graph nodes --------------------------


def expr_dims(x: Any) -> list | None:
    """The shape of an expression over nodes (sympy dims), for the layout ops the matchers emit."""
    if isinstance(x, Node):
        return _dims(x)
    if not isinstance(x, E.Expr) or not x.args:
        return None
    src = expr_dims(x.args[0])
    if src is None:
        return None
    op = x.op
    if op is aten.transpose.int:
        i, j = x.args[1] % len(src), x.args[2] % len(src)
        src[i], src[j] = src[j], src[i]
        return src
    if op is aten.unsqueeze.default:
        d = x.args[1] % (len(src) + 1)
        return [*src[:d], sympy.Integer(1), *src[d:]]
    if op is aten.squeeze.dim:
        d = x.args[1] % len(src)
        return src[:d] + src[d + 1:] if src[d] == 1 else src
    if op in (aten.reciprocal.default, aten.neg.default):
        return src
    if op in (aten.mul.Tensor, aten._to_copy.default):
        other = x.args[1] if op is aten.mul.Tensor and len(x.args) > 1 else None
        if isinstance(other, (Node, E.Expr)):
            od = expr_dims(other)
            if od is None or len(od) > len(src) or any(o not in (1, s) for o, s in zip(od[::-1], src[::-1])):
                return None  # the factor would broadcast q to another shape
        return src
    if op is aten.reshape.default:
        dims: list = []
        for d in x.args[1]:
            if isinstance(d, E.SizeOf):
                of = expr_dims(d.of)
                if of is None:
                    return None
                dims.append(of[d.dim])
            elif isinstance(d, torch.SymInt) or (isinstance(d, int) and d >= 0):
                dims.append(sym(d))
            elif isinstance(d, int) and d == -1:
                dims.append(None)
            else:
                return None
        if dims.count(None) > 1:
            return None
        if None in dims:
            known = sympy.Integer(1)
            for d in dims:
                if d is not None:
                    known = known * d
            total = sympy.Integer(1)
            for d in src:
                total = total * d
            rest = _quotient(total, known)
            if rest is None:
                return None
            dims[dims.index(None)] = rest
        return dims
    return None


def locate(x: Any, axis: int, size: Any) -> tuple[Node, Loc] | None:
    """The graph node an expression's token axis ``axis`` reads, and where the tokens lie in it."""
    dims = expr_dims(x)
    if dims is None:
        return None
    loc: Loc | None = at_axis(dims, axis, size)
    while not isinstance(x, Node):
        src = x.args[0] if isinstance(x, E.Expr) and x.args else None
        ins = expr_dims(src)
        if ins is None:
            return None
        if x.op is aten.transpose.int:
            i, j = x.args[1] % len(dims), x.args[2] % len(dims)
            loc = _moved(dims, loc, ins, lambda b: j if b == i else i if b == j else b)
        elif x.op not in (aten.unsqueeze.default, aten.squeeze.dim, aten.reshape.default, aten.mul.Tensor,
                          aten._to_copy.default):
            return None
        # (views keep the flat order; a scale or a cast keeps the shape)
        if loc is None:
            return None
        x, dims = src, ins
    return x, loc


def token_axes(node: Node, loc: Loc) -> list[int] | None:
    """The axes of ``node`` the tokens at ``loc`` run over (size-1 axes left out)."""
    dims = _dims(node)
    c = None if dims is None else cover(dims, loc)
    return None if c is None else c[0]
