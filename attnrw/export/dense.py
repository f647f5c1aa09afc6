"""ONNX translation of ``torch.ops.attnrw.attention`` (exact dense attention).

* opset >= 23: one standard ``Attention`` node. onnxruntime 1.32 runs versions
  23 and 24 with native CPU kernels (version 25 as its expanded function).
* opset < 23: MatMul / Softmax / MatMul with the GQA expansion, the causal
  constraint and the mask built from standard operators.

Semantics are those of the op (SDPA's): q (batch, heads, q_len, head_dim),
k (batch, kv_heads, kv_len, head_dim), v (batch, kv_heads, kv_len, v_dim);
``attn_mask`` broadcastable to (batch, heads, q_len, kv_len), bool (True =
attend) or additive float; ``is_causal`` keeps key ``j`` for query ``i`` iff
``j <= i`` (top-left aligned, as SDPA's ``is_causal`` and ``Attention``
without a KV cache); a query that sees no key outputs zeros. A row whose
every visible additive entry is ``finfo.min`` (padded query rows, as Hugging
Face and DeBERTa build them) is not empty: in fp32 that value absorbs the
scores, the softmax is uniform and the row is the mean of V over those keys.
MatMul / Add / Softmax does that by itself; the ``Attention`` form needs the
mask moved off onnxruntime's "masked" sentinel
(:func:`~attnrw.export._graph.lowest_off_sentinel`).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript import opset23 as op23

from attnrw.export._graph import (
    Value,
    const,
    dim,
    ints,
    lowest_off_sentinel,
    masked_softmax,
    neg_inf_like,
    rank,
    repeat_kv,
    scalar,
    soft_cap,
    static_dim,
    to_rank4,
)
from attnrw.export.registry import register_translation
from attnrw.kernels import attention as _attention_op  # noqa: F401  (registers torch.ops.attnrw.attention)

#: First opset with the standard ``Attention`` operator.
ATTENTION_OPSET = 23


def dense_translation(opset: int) -> Callable[..., Value]:
    """The translation function of ``attnrw::attention`` for a target ``opset``."""
    return attention_op23 if opset >= ATTENTION_OPSET else attention_decomposed


def _mask_for_attention_op(mask: Value, q: Value, k: Value, like: Value) -> Value:
    """Shape a broadcastable mask the way onnxruntime's ``Attention`` kernel accepts it.

    onnxruntime 1.32 rejects a mask whose second-to-last axis is not q_len
    ("inconsistent q_sequence_length") although the ONNX spec allows
    broadcasting, so a (batch, 1, 1, kv_len) padding mask is expanded over the
    query axis. A float mask is cast to the query's dtype as the op does, and
    its ``finfo.min`` entries moved off onnxruntime's "masked" sentinel
    (:func:`~attnrw.export._graph.lowest_off_sentinel`: a row masked only by
    ``finfo.min`` attends uniformly, as in PyTorch, instead of giving zeros).
    """
    q_len, kv_len = static_dim(q, 2), static_dim(k, 2)
    m_q = static_dim(mask, -2) if rank(mask) >= 2 else 1
    m_k = static_dim(mask, -1)
    # Values built in the trace carry no shape: read everything from the input first.
    lead = [dim(mask, i) for i in range(rank(mask) - 2)]
    same_q = (m_q is not None and m_q == q_len) or (m_q is None and mask.shape[-2] == q.shape[2])
    same_k = (m_k is not None and m_k == kv_len) or (m_k is None and mask.shape[-1] == k.shape[2])
    if mask.dtype != ir.DataType.BOOL:
        mask = lowest_off_sentinel(op.CastLike(mask, like), like.dtype)
    if same_q and same_k:
        return mask
    target = op.Concat(*lead, dim(q, 2), dim(k, 2), axis=0)
    return op.Expand(mask, target)


def attention_op23(
    q: Value,
    k: Value,
    v: Value,
    attn_mask: Value | None = None,
    is_causal: bool = False,
    scale: float = 1.0,
    softcap: float = 0.0,
) -> Value:
    """``attnrw::attention`` as one ONNX ``Attention`` node (opset >= 23).

    The 4-D form takes the head counts from the input shapes, so GQA needs no
    ``q_num_heads`` / ``kv_num_heads`` attributes (they are for 3-D inputs).
    The node's ``softcap`` attribute caps the scores before the mask, as the op does.
    """
    if attn_mask is not None:
        attn_mask = _mask_for_attention_op(attn_mask, q, k, q)
    y, _, _, _ = op23.Attention(q, k, v, attn_mask, is_causal=int(bool(is_causal)), scale=float(scale),
                                softcap=float(softcap))
    return y


def attention_decomposed(
    q: Value,
    k: Value,
    v: Value,
    attn_mask: Value | None = None,
    is_causal: bool = False,
    scale: float = 1.0,
    softcap: float = 0.0,
) -> Value:
    """``attnrw::attention`` in MatMul / Softmax / MatMul form, for opsets without ``Attention``.

    Scale is applied to q before the product (q_len·head_dim multiplies instead
    of q_len·kv_len). The causal constraint is a (q_len, kv_len) comparison of
    ``Range`` outputs, so a dynamic length works.
    """
    heads = static_dim(q, 1)
    if heads is None:
        raise ValueError("the number of query heads must be static to export attention")
    # Values built in the trace carry no shape: read the lengths before repeat_kv.
    q_len, kv_len = dim(q, 2), dim(k, 2)
    k = repeat_kv(k, heads)
    v = repeat_kv(v, heads)
    qs = op.Mul(q, op.CastLike(const(float(scale), "float32"), q))
    scores = soft_cap(op.MatMul(qs, op.Transpose(k, perm=[0, 1, 3, 2])), softcap)

    keep = None
    if is_causal:
        rows = op.Range(const(0), scalar(q_len), const(1))
        cols = op.Range(const(0), scalar(kv_len), const(1))
        keep = op.LessOrEqual(op.Unsqueeze(cols, ints(0)), op.Unsqueeze(rows, ints(1)))
    if attn_mask is not None:
        mask = to_rank4(attn_mask)
        if attn_mask.dtype == ir.DataType.BOOL:
            keep = mask if keep is None else op.And(keep, mask)
        else:
            scores = op.Add(scores, op.CastLike(mask, scores))
    if keep is not None:
        scores = op.Where(keep, scores, neg_inf_like(scores))
    # Without a mask every row sees at least one key and Softmax needs no guard.
    p = masked_softmax(scores, guard_empty_rows=attn_mask is not None)
    return op.MatMul(p, v)


register_translation(torch.ops.attnrw.attention.default, dense_translation, per_opset=True)
