"""ONNX translations of the ops of ``Merge(mode="tokens")`` (:mod:`attnrw.kernels.merge.tokens`).

``attnrw::tokens_attention`` -> ``(out, step, index_out, sizes_out)``
    The same pieces as ``merged_attention`` (:mod:`attnrw.export.merge`),
    on the ``T`` current tokens of a token state (``index`` (B, N),
    ``sizes`` (B, T); none: the original tokens):

    1. **The count** is exact: ``exact_count(T, ratio, r, P)`` with ``P``
       the protected positions below ``N``, i.e. the request clipped to
       ``T - P - 2``, computed in the graph.
    2. **The plan** is :func:`attnrw.export.merge._match` (the one Loop of
       both ops) with the options ``tokens_attention`` gives ``merge_plan``:
       token weights ``sizes`` (size-weighted metric means), protected
       *slots* (those holding a protected position: a ``ScatterElements``
       max of the positions' flags over ``index``), padding kinds from the
       current keys' bias (below), padding pairs ranked first (+4), and the
       single-pair fallback round (a ``(B, T, T)`` score matrix, one
       ``ArgMax``) when a bipartite round finds no eligible A token.
    3. **The bias** lives in the original token space: the mask (shape
       (B|1, h|1, 1|N, N)) made additive, log-sum-exp over the original
       members of each current key (for the padding kinds) and of each
       merged key (the attention bias; ``log size`` without a mask). A mask
       whose query rows differ gives a merged query the mean of its members'
       rows; one whose rows are all equal (a padding mask built as
       (B, 1, N, N)) is used as its first row, decided at run time as the op
       does.
    4. q, k, v are ``sizes``-weighted means over the merged tokens
       (``ScatterND`` sums), attention is the ``Attention`` node at opset
       >= 23 or MatMul / Softmax / MatMul below, a query that sees no key
       outputs 0. ``step`` is the plan's index over the ``T`` tokens,
       ``index_out`` its composition with ``index`` (``GatherElements``).

    With nothing to merge the op runs dense attention on the original mask
    and this graph the same attention over size-1 tokens: equal up to
    rounding.

``attnrw::merge_tokens`` / ``attnrw::restore_tokens``
    The layout of ``x`` (``tok_dim``, ``batch_dim``) is turned into rows
    (B, tokens, features) and back with Transpose / Reshape exactly as the
    op's ``_rows`` / ``_unrows`` do (one batch-major axis when the two are
    equal; a batch axis holding batch × more is split; one of static size 1
    is expanded over the batch). ``merge_tokens`` maps each source slot to
    its destination slot (``ScatterElements`` of ``dst_index`` over
    ``src_index``) and takes ``src_sizes``-weighted means (float32 sums for
    half inputs); ``restore_tokens`` gathers each token's merged row
    (``GatherND``).

Shapes follow the run-time length, so a program exported with a dynamic
sequence length runs at any length. (``attnrw.rewrite`` emits the tokens ops
for static shapes only; with dynamic shapes its sites stay
``merged_attention`` in ``qkv`` mode.) The head counts must be static. The
plan is a discrete choice: keys whose similarities tie to within float32
rounding may pick another partner in onnxruntime than in PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op

from attnrw.export._graph import Value, const, dim, ints, rank, static_dim, to_rank4
from attnrw.export.dense import ATTENTION_OPSET
from attnrw.export.registry import register_translation
from attnrw.export.merge import (
    _acc_dtype,
    _additive,
    _arange,
    _attend,
    _gather_rows,
    _head_counts,
    _key_logsumexp,
    _key_metric,
    _key_padding,
    _mask_query_rows,
    _match,
    _merge_bias_rows,
    _merge_tokens,
    _Plan,
    _protected,
    _request,
    _segment_mean,
)


def tokens_translation(opset: int) -> Callable[..., tuple[Value, Value, Value, Value]]:
    """The translation function of ``attnrw::tokens_attention`` for a target ``opset`` (>= 18)."""

    def tokens_attention(
        q: Value,
        k: Value,
        v: Value,
        attn_mask: Value | None = None,
        scale: float = 1.0,
        ratio: float = 0.0,
        r: int = -1,
        protect: Sequence[int] = (),
        index: Value | None = None,
        sizes: Value | None = None,
        impl: str = "auto",
    ) -> tuple[Value, Value, Value, Value]:
        return tokens_attention_graph(q, k, v, attn_mask, scale, ratio, r, protect, index, sizes, opset=opset)

    return tokens_attention


def tokens_attention_graph(
    q: Value,
    k: Value,
    v: Value,
    attn_mask: Value | None,
    scale: float,
    ratio: float,
    r: int,
    protect: Sequence[int],
    index: Value | None,
    sizes: Value | None,
    opset: int = ATTENTION_OPSET,
) -> tuple[Value, Value, Value, Value]:
    """Trace the tokens_attention site (module docstring): (out (B, H, M, Dv), step (B, T), index (B, N), sizes (B, M))."""
    heads = _head_counts(q, k)
    batch, t = dim(q, 0), dim(q, 2)
    fresh = index is None or sizes is None
    if fresh:
        grid = op.Concat(batch, t, axis=0)
        index, sizes, n = op.Expand(op.Unsqueeze(_arange(t), ints(0)), grid), op.Expand(ints(1), grid), t
    else:
        n = dim(index, 1)
    state = _Plan(index=index, sizes=sizes, m=t, batch=batch)
    acc = _acc_dtype(q.dtype)

    madd = kind = None
    if attn_mask is not None:
        madd = _additive(to_rank4(attn_mask), attn_mask.dtype == ir.DataType.BOOL, acc)  # (mb, h', q', N)
        # The current keys' bias over their members (on original tokens: the mask itself) gives the padding kinds.
        key_bias = madd if fresh else _key_logsumexp(madd, state)
        kind = _key_padding(key_bias, False, batch, t)

    positions = sorted({int(p) for p in protect if int(p) >= 0})
    prot = None
    protected = ints(0)
    if positions:
        at = _protected(positions, batch, n)  # (B, N): protected positions
        prot = at if fresh else _slots_holding(at, index, batch, t)
        below = op.Less(const(np.array(positions, dtype=np.int64)), n)
        protected = op.ReduceSum(op.Cast(below, to=ir.DataType.INT64), keepdims=1)
    # exact_count: the request clipped to T - P - 2 (merges that are always possible).
    want = op.Max(op.Min(_request(t, ratio, r), op.Sub(op.Sub(t, protected), ints(2))), ints(0))

    step, new_sizes = _match(_key_metric(k), sizes, want, batch, prot, kind, exact=True, padding_first=True)
    m = op.Shape(new_sizes, start=1, end=2)
    new_index = op.GatherElements(step, index, axis=1)
    merged = _Plan(index=new_index, sizes=new_sizes, m=m, batch=batch)
    if madd is None:
        bias = op.Unsqueeze(op.Log(op.Cast(new_sizes, to=acc)), ints(1, 2))  # (B, 1, 1, M)
    else:
        bias = _key_logsumexp(madd, merged)  # (B, h', q', M)
        if _mask_query_rows(attn_mask) != 1:
            bias = _rows_of_queries(madd, bias, merged)

    on_step = _Plan(index=step, sizes=new_sizes, m=m, batch=batch)
    weights = None if fresh else sizes
    qm, km, vm = (_merge_tokens(x, on_step, weights) for x in (q, k, v))
    out = _attend(qm, km, vm, bias, m, float(scale), madd is not None, opset, heads, q.dtype)
    return out, step, new_index, new_sizes


def _slots_holding(at: Value, index: Value, batch: Value, t: Value) -> Value:
    """(B, T) bool: the slots that hold a flagged original token (``at`` (B, N))."""
    zeros = op.Expand(ints(0), op.Concat(batch, t, axis=0))
    hit = op.ScatterElements(zeros, index, op.Cast(at, to=ir.DataType.INT64), axis=1, reduction="max")
    return op.Cast(hit, to=ir.DataType.BOOL)


def _rows_of_queries(madd: Value, bias: Value, merged: _Plan) -> Value:
    """The bias of a mask with a query axis: its first row where all rows are equal, else merged rows (the op's rule)."""
    first = op.Slice(madd, ints(0), ints(1), ints(2))
    same = op.ReduceMin(op.Cast(op.Equal(madd, first), to=ir.DataType.INT32), keepdims=0)
    one_row = _key_logsumexp(first, merged)  # (B, h', 1, M)
    return op.Where(op.Cast(same, to=ir.DataType.BOOL), one_row, _merge_bias_rows(bias, merged))  # (B, h', M, M)


# ----------------------------------------------------------------------------- merge_tokens, restore_tokens


def merge_tokens(
    x: Value,
    src_index: Value | None,
    src_sizes: Value | None,
    dst_index: Value,
    dst_sizes: Value,
    tok_dim: int,
    batch_dim: int,
) -> Value:
    """The translation of ``attnrw::merge_tokens``: ``x`` in state ``src`` (None: original tokens) -> state ``dst``."""
    batch = dim(dst_index, 0)
    if src_index is None or src_sizes is None:
        step, weights = dst_index, None
    else:  # the destination slot of every source slot (all members of one agree)
        zeros = op.Expand(ints(0), op.Concat(batch, dim(src_sizes, 1), axis=0))
        step = op.ScatterElements(zeros, src_index, dst_index, axis=1, reduction="max")
        weights = src_sizes
    layout = _Layout.of(x, tok_dim, batch_dim, batch)
    plan = _Plan(index=step, sizes=dst_sizes, m=dim(dst_sizes, 1), batch=batch)
    return layout.back(_segment_mean(layout.rows, plan, x.dtype, 1, weights))


def restore_tokens(x: Value, index: Value, tok_dim: int, batch_dim: int) -> Value:
    """The translation of ``attnrw::restore_tokens``: each original token takes its merged token's row."""
    layout = _Layout.of(x, tok_dim, batch_dim, dim(index, 0))
    return layout.back(_gather_rows(layout.rows, index))


@dataclass(frozen=True)
class _Layout:
    """``x`` seen as ``rows`` (B, tokens, features), and the way back (the op's ``_rows`` / ``_unrows``).

    ``moved`` is ``x`` with the batch axis (and the token axis, unless
    ``joint``) moved to the front by ``perm``.
    """

    rows: Value
    moved: Value
    perm: list[int]
    joint: bool
    batch: Value

    @staticmethod
    def of(x: Value, tok_dim: int, batch_dim: int, batch: Value) -> _Layout:
        r = rank(x)
        tok_dim, batch_dim = tok_dim % r, batch_dim % r
        if tok_dim == batch_dim:  # one axis of batch × tokens, batch-major
            perm = [tok_dim] + [d for d in range(r) if d != tok_dim]
            moved = _transpose(x, perm)
            tokens = op.Div(op.Shape(moved, start=0, end=1), batch)
            rows = op.Reshape(moved, op.Concat(batch, tokens, ints(-1), axis=0))
            return _Layout(rows, moved, perm, True, batch)
        if static_dim(x, batch_dim) == 1:  # broadcast over the batch
            x = op.Expand(x, op.Concat(*[batch if d == batch_dim else ints(1) for d in range(r)], axis=0))
        perm = [batch_dim, tok_dim] + [d for d in range(r) if d not in (batch_dim, tok_dim)]
        moved = _transpose(x, perm)  # (B · extra, tokens, ...)
        extra = op.Div(op.Shape(moved, start=0, end=1), batch)
        tokens = op.Shape(moved, start=1, end=2)
        split = op.Reshape(moved, op.Concat(batch, extra, tokens, ints(-1), axis=0))
        rows = op.Reshape(op.Transpose(split, perm=[0, 2, 1, 3]), op.Concat(batch, tokens, ints(-1), axis=0))
        return _Layout(rows, moved, perm, False, batch)

    def back(self, rows: Value) -> Value:
        """(B, tokens', features) -> ``x``'s layout with ``tokens'`` tokens."""
        rest = op.Shape(self.moved, start=1 if self.joint else 2)
        if self.joint:
            moved = op.Reshape(rows, op.Concat(ints(-1), rest, axis=0))
        else:
            tokens = op.Shape(rows, start=1, end=2)
            extra = op.Div(op.Shape(self.moved, start=0, end=1), self.batch)
            split = op.Reshape(rows, op.Concat(self.batch, tokens, extra, rest, axis=0))  # (B, tokens', extra, ...)
            tail = len(self.perm) - 2
            folded = op.Transpose(split, perm=[0, 2, 1, *range(3, 3 + tail)])
            moved = op.Reshape(folded, op.Concat(ints(-1), tokens, rest, axis=0))
        return _transpose(moved, [self.perm.index(d) for d in range(len(self.perm))])


def _transpose(x: Value, perm: list[int]) -> Value:
    return x if perm == sorted(perm) else op.Transpose(x, perm=perm)


register_translation(torch.ops.attnrw.tokens_attention.default, tokens_translation, per_opset=True)
register_translation(torch.ops.attnrw.merge_tokens.default, merge_tokens)
register_translation(torch.ops.attnrw.restore_tokens.default, restore_tokens)
