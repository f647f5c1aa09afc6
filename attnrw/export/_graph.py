"""Small building blocks shared by the ONNX translations.

The translations are *traced* Python functions: the ONNX exporter calls them
with symbolic values (``onnx_ir.Value`` subclasses whose ``shape`` holds ints
for static dimensions) and records every ``opset18.*`` call as a node. Python
control flow on static facts (the op's attributes, static dimensions) is
therefore free; anything that depends on a dynamic length is built in-graph.

Only operators whose semantics have not changed between opset 18 and the
newest supported opset are used here, so one trace serves every target opset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

Value = Any  # the exporter's symbolic tensor; kept loose because its class is private


def const(array: Any, dtype: Any = None) -> Value:
    """An ONNX ``Constant`` node holding ``array`` (int lists become int64)."""
    arr = np.asarray(array, dtype=dtype)
    if arr.dtype == np.int32 or (arr.dtype.kind == "i" and dtype is None):
        arr = arr.astype(np.int64)
    return op.Constant(value=ir.tensor(arr))


def ints(*values: int) -> Value:
    """A 1-D int64 constant (shapes, axes, pads)."""
    return const(np.array(values, dtype=np.int64))


def static_dim(x: Value, axis: int) -> int | None:
    """The size of ``x`` along ``axis`` when it is known at export time, else ``None``."""
    shape = x.shape
    if shape is None:
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def rank(x: Value) -> int:
    """The rank of ``x``; the exporter always knows it for attnrw op inputs."""
    if x.shape is None:
        raise ValueError("an input of an attnrw op has unknown rank; cannot translate it to ONNX")
    return len(x.shape)


def dim(x: Value, axis: int) -> Value:
    """``[x.shape[axis]]`` as a 1-D int64 tensor: a constant when static, ``Shape`` otherwise."""
    s = static_dim(x, axis)
    if s is not None:
        return ints(s)
    axis = axis % rank(x)
    return op.Shape(x, start=axis, end=axis + 1)


def scalar(x: Value) -> Value:
    """A 1-element 1-D tensor reshaped to a 0-D scalar (what ``Range`` takes)."""
    return op.Reshape(x, const(np.zeros((0,), dtype=np.int64)))


def soft_cap(scores: Value, softcap: float) -> Value:
    """``softcap · tanh(scores / softcap)`` (the ops' ``softcap``); ``scores`` for 0."""
    if not softcap:
        return scores
    cap = op.CastLike(const(float(softcap), "float32"), scores)
    return op.Mul(op.Tanh(op.Div(scores, cap)), cap)


def neg_inf_like(x: Value) -> Value:
    """A scalar ``-inf`` of ``x``'s dtype."""
    return op.CastLike(const(np.array(-np.inf, dtype=np.float32)), x)


def zero_like(x: Value) -> Value:
    return op.CastLike(const(np.array(0.0, dtype=np.float32)), x)


def lowest_off_sentinel(mask: Value, dtype: ir.DataType | None) -> Value:
    """An additive ``mask`` of ``dtype`` for onnxruntime's ``Attention``: entries equal to the dtype's lowest
    finite value moved one step toward zero.

    onnxruntime 1.32's CPU ``Attention`` kernel reads a mask entry equal to
    ``finfo.min`` as "masked", like ``-inf``: a row whose every entry is
    ``finfo.min`` outputs zeros. In PyTorch (and in the ONNX definition,
    ``softmax(Q·Kᵀ·scale + mask)``) that value absorbs the scores in fp32
    (``|score|`` below half its ulp, ~1e31), so such a row (Hugging Face's
    padded query rows, DeBERTa's ``masked_fill(~mask, finfo.min)``) attends
    uniformly over its keys. The next value up absorbs the scores the same way
    and is not the sentinel, so every row keeps its PyTorch value: a row that
    sees some other key weighs the moved entries by ``exp(-3.4e38) = 0`` as
    before; a row that sees none spreads evenly over the keys that held it.
    Cost: one ``Equal`` and one ``Where`` over the mask's own elements (before
    any broadcast over heads), nothing on the scores: ~1.8 ms per million mask
    elements on the 2-core CPU (B=1, H=8, S=1024, D=64 with a (1, 1, S, S)
    mask: 28.8 -> 31.4 ms; a (B, 1, 1, S) padding mask costs S elements).

    ``dtype`` is read off an input of the op (values built in the trace carry
    none); unknown, the translation cannot be right and refuses.
    """
    if dtype is None:
        raise ValueError("the dtype of an attention mask must be known to export it for onnxruntime's Attention")
    if not dtype.is_floating_point():
        return mask
    import ml_dtypes  # a dependency of onnx_ir; knows bfloat16 as well

    lowest = np.array(ml_dtypes.finfo(dtype.numpy()).min, dtype=dtype.numpy())
    # Sign-magnitude: one less in the bits of a negative number is one step toward zero.
    bits = lowest.view(f"uint{8 * lowest.itemsize}")
    above = (bits - 1).astype(bits.dtype).view(lowest.dtype)
    return op.Where(op.Equal(mask, op.Constant(value=ir.tensor(lowest))), op.Constant(value=ir.tensor(above)), mask)


def to_rank4(mask: Value) -> Value:
    """Left-pad a mask's shape with 1s to rank 4 (SDPA broadcasting)."""
    r = rank(mask)
    if r > 4:
        raise ValueError(f"an attention mask of rank {r} cannot broadcast to (batch, heads, q_len, kv_len)")
    if r == 4:
        return mask
    return op.Unsqueeze(mask, ints(*range(4 - r)))


def repeat_kv(x: Value, heads: int) -> Value:
    """Repeat (batch, kv_heads, len, dim) to (batch, heads, len, dim), each kv head ``heads // kv_heads`` times.

    Matches ``repeat_interleave(groups, dim=1)``: query head ``h`` reads kv head
    ``h // groups`` (the GQA convention of SDPA and of ONNX ``Attention``).
    """
    kv_heads = static_dim(x, 1)
    if kv_heads is None:
        raise ValueError("the number of key/value heads must be static to export grouped-query attention")
    if kv_heads == heads:
        return x
    groups = heads // kv_heads
    expanded = op.Expand(op.Unsqueeze(x, ints(2)), ints(1, 1, groups, 1, 1))
    shape = op.Concat(dim(x, 0), ints(heads), dim(x, 2), dim(x, 3), axis=0)
    return op.Reshape(expanded, shape)


def masked_softmax(scores: Value, guard_empty_rows: bool) -> Value:
    """Softmax over the last axis; with ``guard_empty_rows`` a row whose scores are all ``-inf`` gives zeros.

    The guard is the SDPA / ONNX ``Attention`` convention for a query that may
    see no key (Softmax alone would give NaN). It costs a ``ReduceMax`` over the
    scores, so callers skip it when no row can be empty.
    """
    p = op.Softmax(scores, axis=-1)
    if not guard_empty_rows:
        return p
    row_max = op.ReduceMax(scores, ints(-1), keepdims=1)
    empty = op.Equal(row_max, neg_inf_like(scores))
    return op.Where(empty, zero_like(scores), p)
