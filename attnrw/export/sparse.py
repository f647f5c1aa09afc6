"""ONNX translation of ``torch.ops.attnrw.sparse_attention`` (sinks + sliding window).

The window is exported in O(S·W) standard operators, never as an S×S matrix:

1. The sequence is cut into chunks of ``C`` queries; the chunks are folded
   into a batch axis: q (B, H, S, D) -> (B, H, nb, C, D), after padding S up
   to ``nb·C``.
2. Each query chunk attends to the key chunks its band can reach: ``before``
   chunks behind it and ``after`` ahead (0 for causal), plus its own. Keys are
   padded by ``before·C`` in front so that chunk ``b``'s keys are
   ``nk = before + 1 + after`` consecutive chunks starting at chunk ``b`` of
   the padded keys: ``nk`` slices concatenated, (B, H, nb, nk·C, D).
3. The first ``sinks`` keys are concatenated in front of every chunk's keys.
4. Which of those (C, sinks + nk·C) scores are visible is built in-graph from
   ``Range`` outputs and the dynamic length: the band edges (a constant,
   since they depend only on the offset inside the chunk), padded keys, sink
   keys that must not count twice, the causal limit on sinks, and the site's
   own mask gathered at exactly those (query, key) positions.

So a dynamic sequence length works, and the biggest tensor is
(B, H, nb, C, sinks + nk·C). Semantics (of the op; ``Sparse`` in config.py):
q_len == kv_len == S; causal: query ``i`` sees ``i - window < j <= i``;
bidirectional: ``|i - j| <= window // 2``; both also see keys ``j < sinks``
(causal: still ``j <= i``); the mask applies on top; a query that sees no
key outputs zeros. ``topk > 0`` (run-time chosen blocks) is not exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from attnrw.errors import ConfigError
from attnrw.export._graph import (
    Value,
    const,
    dim,
    ints,
    masked_softmax,
    neg_inf_like,
    rank,
    repeat_kv,
    scalar,
    static_dim,
    to_rank4,
)

#: Smallest query chunk: below it the per-chunk MatMuls are too small to pay
#: for their overhead in onnxruntime.
MIN_CHUNK = 16


def check_exportable(topk: int) -> None:
    """Raise ``ConfigError`` for sparse settings the ONNX translation does not support."""
    if topk:
        raise ConfigError(
            f"ONNX export supports Sparse(topk=0) only (got topk={topk}): the top-k key blocks are "
            "chosen at run time from block-pooled scores, which has no O(S·W) form in standard ONNX "
            "operators. Export with topk=0, or keep the model in PyTorch."
        )


@dataclass(frozen=True)
class BandLayout:
    """How the band is cut into chunks: ``chunk`` queries per chunk, ``before``/``after`` key chunks."""

    chunk: int
    before: int
    after: int
    window: int
    causal: bool

    @property
    def key_chunks(self) -> int:
        return self.before + 1 + self.after

    def band(self) -> np.ndarray:
        """(chunk, key_chunks·chunk) bool: the window's edges for a query at offset r in its chunk.

        Key column ``c`` of a chunk sits ``c - before·chunk - r`` positions
        from the query, whatever the chunk's index.
        """
        r = np.arange(self.chunk)[:, None]
        c = np.arange(self.key_chunks * self.chunk)[None, :]
        rel = c - self.before * self.chunk - r
        if self.causal:
            return (rel > -self.window) & (rel <= 0)
        return np.abs(rel) <= self.window // 2


def plan_layout(window: int, causal: bool, seq_len: int | None = None, chunk: int | None = None) -> BandLayout:
    """Choose the chunk size for a window.

    ``reach`` is how far the band extends on one side of a query. A chunk as
    long as the reach needs one neighbour chunk per side: 2·reach keys per
    query for a causal band of ``window`` keys, 1.5·window for a bidirectional
    one, in few large MatMuls (benchmarks/bench_onnx.py compares sizes). With
    a static ``seq_len`` the reach is clipped to the sequence, so short
    sequences are not padded to a long window.
    """
    reach = window - 1 if causal else window // 2
    if seq_len is not None:
        reach = min(reach, max(seq_len - 1, 0))
    if chunk is None:
        chunk = max(reach, MIN_CHUNK)
        if seq_len is not None:
            chunk = max(1, min(chunk, seq_len))
    before = math.ceil(reach / chunk) if reach > 0 else 0
    return BandLayout(chunk=chunk, before=before, after=0 if causal else before, window=window, causal=causal)


def sparse_translation(opset: int, chunk: int | None = None) -> Callable[..., Value]:
    """The translation function of ``attnrw::sparse_attention``; the same graph for every opset >= 18.

    ``chunk`` overrides the chunk size chosen by :func:`plan_layout` (benchmarks).
    """

    def sparse_attention(
        q: Value,
        k: Value,
        v: Value,
        attn_mask: Value | None = None,
        is_causal: bool = False,
        scale: float = 1.0,
        window: int = 1,
        sinks: int = 0,
        topk: int = 0,
        block_size: int = 64,
        impl: str = "auto",
    ) -> Value:
        return sparse_attention_graph(q, k, v, attn_mask, is_causal, scale, window, sinks, topk, chunk=chunk)

    return sparse_attention


def sparse_attention_graph(
    q: Value,
    k: Value,
    v: Value,
    attn_mask: Value | None,
    is_causal: bool,
    scale: float,
    window: int,
    sinks: int,
    topk: int,
    chunk: int | None = None,
) -> Value:
    """Trace the chunked window (see the module docstring) and return (B, H, S, Dv)."""
    check_exportable(topk)
    heads = static_dim(q, 1)
    if heads is None:
        raise ValueError("the number of query heads must be static to export sparse attention")
    s_q, s_k = static_dim(q, 2), static_dim(k, 2)
    if s_q is not None and s_k is not None and s_q != s_k:
        raise ValueError(f"sparse attention needs q_len == kv_len, got {s_q} and {s_k}")
    layout = plan_layout(int(window), bool(is_causal), s_q, chunk)
    c, nk = layout.chunk, layout.key_chunks
    # Shapes are read from the op's inputs: values built inside the trace carry none.
    k_dim, v_dim = dim(k, 3), dim(v, 3)
    k = repeat_kv(k, heads)
    v = repeat_kv(v, heads)

    seq = dim(q, 2)  # [S]
    n_chunks = op.Div(op.Add(seq, ints(c - 1)), ints(c))  # [nb] = ceil(S / C)
    tail = op.Sub(op.Mul(n_chunks, ints(c)), seq)  # padding that makes S a multiple of C
    batch = dim(q, 0)

    qs = op.Mul(q, op.CastLike(const(float(scale), "float32"), q))
    qs = op.Pad(qs, op.Concat(ints(0), tail, axis=0), None, ints(2))
    q_chunks = op.Reshape(qs, op.Concat(batch, ints(heads), n_chunks, ints(c), dim(q, 3), axis=0))

    keys = _key_windows(k, layout, n_chunks, tail, op.Concat(batch, ints(heads, -1, c), k_dim, axis=0))
    values = _key_windows(v, layout, n_chunks, tail, op.Concat(batch, ints(heads, -1, c), v_dim, axis=0))

    # Positions: chunk b, query offset r, key column j (0 .. nk·C).
    b = op.Unsqueeze(op.Range(const(0), scalar(n_chunks), const(1)), ints(1))  # (nb, 1)
    q_pos = op.Add(op.Mul(b, ints(c)), const(np.arange(c)[None, :]))  # (nb, C)
    k_pos = op.Add(op.Mul(op.Sub(b, ints(layout.before)), ints(c)), const(np.arange(nk * c)[None, :]))  # (nb, nk·C)
    # Sink keys live in their own columns: exclude them from the window so none counts twice.
    in_seq = op.And(op.GreaterOrEqual(k_pos, ints(max(sinks, 0))), op.Less(k_pos, seq))
    visible = op.And(const(layout.band()[None]), op.Unsqueeze(in_seq, ints(1)))  # (nb, C, nk·C)

    if sinks > 0:
        n_sinks = op.Min(seq, ints(sinks))
        sink_pos = op.Range(const(0), scalar(n_sinks), const(1))  # (ns,)
        expand_chunks = op.Concat(ints(1, 1), n_chunks, ints(1, 1), axis=0)
        keys = op.Concat(op.Expand(op.Unsqueeze(op.Slice(k, ints(0), ints(sinks), ints(2)), ints(2)), expand_chunks), keys, axis=3)
        values = op.Concat(op.Expand(op.Unsqueeze(op.Slice(v, ints(0), ints(sinks), ints(2)), ints(2)), expand_chunks), values, axis=3)
        if is_causal:
            sink_visible = op.LessOrEqual(op.Unsqueeze(sink_pos, ints(0, 1)), op.Unsqueeze(q_pos, ints(2)))
        else:
            sink_visible = op.Expand(const(np.array(True)), op.Concat(n_chunks, ints(c), n_sinks, axis=0))
        visible = op.Concat(sink_visible, visible, axis=2)
        k_pos = op.Concat(op.Expand(op.Unsqueeze(sink_pos, ints(0)), op.Concat(n_chunks, n_sinks, axis=0)), k_pos, axis=1)

    scores = op.MatMul(q_chunks, op.Transpose(keys, perm=[0, 1, 2, 4, 3]))  # (B, H, nb, C, ns + nk·C)
    if attn_mask is not None:
        gathered = _gather_mask(attn_mask, q_pos, k_pos, seq)
        if attn_mask.dtype == ir.DataType.BOOL:
            visible = op.And(visible, gathered)
        else:
            scores = op.Add(scores, op.CastLike(gathered, scores))
    scores = op.Where(visible, scores, neg_inf_like(scores))
    # Without a mask every real query sees itself; only padded rows can be empty and they are cut off.
    probs = masked_softmax(scores, guard_empty_rows=attn_mask is not None)
    out = op.MatMul(probs, values)  # (B, H, nb, C, Dv)
    out = op.Reshape(out, op.Concat(batch, ints(heads, -1), v_dim, axis=0))
    return op.Slice(out, ints(0), seq, ints(2))


def _key_windows(x: Value, layout: BandLayout, n_chunks: Value, tail: Value, chunked_shape: Value) -> Value:
    """(B, H, S, D) -> (B, H, nb, nk·C, D): for each query chunk, the key chunks its band reaches.

    ``chunked_shape`` is ``[B, H, -1, C, D]``.
    """
    c = layout.chunk
    front = ints(layout.before * c)
    back = op.Add(tail, ints(layout.after * c))
    padded = op.Pad(x, op.Concat(front, back, axis=0), None, ints(2))
    chunks = op.Reshape(padded, chunked_shape)
    if layout.key_chunks == 1:
        return chunks
    parts = [op.Slice(chunks, ints(o), op.Add(n_chunks, ints(o)), ints(2)) for o in range(layout.key_chunks)]
    return op.Concat(*parts, axis=3)


def _gather_mask(mask: Value, q_pos: Value, k_pos: Value, seq: Value) -> Value:
    """The mask's entries at (q_pos, k_pos), shaped to broadcast against (B, H, nb, C, K).

    ``q_pos`` is (nb, C) and ``k_pos`` (nb, K). Positions past the sequence
    (padding) are clamped: their scores are hidden by ``visible`` anyway. A
    mask axis of static size 1 broadcasts and is not indexed, so a
    (B, 1, 1, S) padding mask is gathered along keys only, and a full
    (…, S, S) mask through its flattened last two axes — it is read, never
    copied whole.
    """
    last = op.Sub(seq, ints(1))
    q_idx = op.Min(op.Max(q_pos, ints(0)), last)
    k_idx = op.Min(op.Max(k_pos, ints(0)), last)
    r = rank(mask)
    per_query = r >= 2 and static_dim(mask, -2) != 1
    per_key = static_dim(mask, -1) != 1
    key_len = dim(mask, -1)
    mask = to_rank4(mask)
    if not per_query and not per_key:
        return op.Unsqueeze(mask, ints(2))  # (mb, mh, 1, 1, 1)
    if not per_query:
        flat = op.Reshape(mask, ints(0, 0, -1))  # (mb, mh, S)
        return op.Gather(flat, op.Unsqueeze(k_idx, ints(1)), axis=2)  # (mb, mh, nb, 1, K)
    if not per_key:
        flat = op.Reshape(mask, ints(0, 0, -1))
        return op.Gather(flat, op.Unsqueeze(q_idx, ints(2)), axis=2)  # (mb, mh, nb, C, 1)
    flat = op.Reshape(mask, ints(0, 0, -1))  # (mb, mh, S·S)
    idx = op.Add(op.Mul(op.Unsqueeze(q_idx, ints(2)), key_len), op.Unsqueeze(k_idx, ints(1)))  # (nb, C, K)
    return op.Gather(flat, idx, axis=2)
