"""ONNX translation of ``torch.ops.attnrw.sparse_attention`` (sinks + sliding window).

The window is exported in O(S·W) standard operators, never as an S×S matrix:

1. The sequence is cut into chunks of ``C`` queries (S padded up to
   ``nb·C``), and the chunks are folded into the batch axis.
2. Each query chunk reads the keys its band can reach: the ``sinks`` first
   keys, then ``nk = before + 1 + after`` key chunks around its own
   (``after = 0`` for causal) — ``K = sinks + nk·C`` key rows per chunk,
   read with one ``Gather`` of in-graph positions (no padded or sliced copies).
3. Which of the (C, K) scores are visible is built in-graph from ``Range``
   outputs and the dynamic length: the band edges (a constant: they depend
   only on the offset inside the chunk), positions outside the sequence, sink
   keys that must not count twice, the causal limit on sinks, and the site's
   own mask gathered at exactly those (query, key) positions.
4. At opset >= 23 the chunks are the batch of one standard ``Attention``
   node (onnxruntime's fused CPU kernel); below, MatMul / Where / Softmax /
   MatMul on the same chunks.

So a dynamic sequence length works, and the biggest tensor is
(B, H, nb, C, K). Semantics (of the op; ``Sparse`` in config.py):
q_len == kv_len == S; causal: query ``i`` sees ``i - window < j <= i``;
bidirectional: ``|i - j| <= window // 2``; both also see keys ``j < sinks``
(causal: still ``j <= i``); the mask applies on top; a query that sees no
key outputs zeros, and one whose visible keys an additive ``finfo.min`` hides
all (padded query rows) attends evenly over them, as the op does in PyTorch. ``topk > 0`` (run-time chosen blocks) is not exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript import opset23 as op23

from attnrw.policies import DEFAULT_BLOCK_SIZE
from attnrw.errors import ConfigError
from attnrw.export.dense import ATTENTION_OPSET
from attnrw.export.registry import register_translation
from attnrw.kernels import sparse as _sparse_op  # noqa: F401  (registers torch.ops.attnrw.sparse_attention)
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


def plan_layout(
    window: int,
    causal: bool,
    seq_len: int | None = None,
    chunk: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> BandLayout:
    """Choose the chunk size ``C`` for a window.

    ``reach`` is how far the band extends on one side of a query; a query
    chunk then reads ``reach + C`` keys per query (plus the sinks), and the
    gathered key rows cost ``D / C`` of the score work. The default ``C`` is
    the op's ``block_size`` (``Sparse.block_size``, 64), shrunk to the reach
    for short windows: at S=8192, W=256, H=8, D=64 chunks of 64 and 128 ran
    within noise of each other and 256 slower (benchmarks/bench_onnx.py
    --chunks). With a static ``seq_len`` the reach is clipped to the
    sequence, so short sequences are not padded to a long window.
    """
    reach = window - 1 if causal else window // 2
    if seq_len is not None:
        reach = min(reach, max(seq_len - 1, 0))
    if chunk is None:
        chunk = max(MIN_CHUNK, min(block_size, reach))
        if seq_len is not None:
            chunk = max(1, min(chunk, seq_len))
    before = math.ceil(reach / chunk) if reach > 0 else 0
    return BandLayout(chunk=chunk, before=before, after=0 if causal else before, window=window, causal=causal)


def sparse_translation(opset: int, chunk: int | None = None) -> Callable[..., Value]:
    """The translation function of ``attnrw::sparse_attention`` for a target ``opset`` (>= 18).

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
        softcap: float = 0.0,
    ) -> Value:
        return sparse_attention_graph(
            q, k, v, attn_mask, is_causal, scale, window, sinks, topk, block_size, chunk=chunk, opset=opset,
            softcap=softcap,
        )

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
    block_size: int = DEFAULT_BLOCK_SIZE,
    chunk: int | None = None,
    opset: int = ATTENTION_OPSET,
    softcap: float = 0.0,
) -> Value:
    """Trace the chunked window (see the module docstring) and return (B, H, S, Dv).

    At opset >= 23 every chunk is one batch entry of a single standard
    ``Attention`` node (onnxruntime's fused kernel: no score tensor goes
    through memory between MatMul, mask, Softmax and MatMul); below, the same
    chunks go through MatMul / Where / Softmax / MatMul.
    """
    check_exportable(topk)
    heads, kv_heads = static_dim(q, 1), static_dim(k, 1)
    if heads is None or kv_heads is None:
        raise ValueError("the numbers of query and key/value heads must be static to export sparse attention")
    s_q, s_k = static_dim(q, 2), static_dim(k, 2)
    if s_q is not None and s_k is not None and s_q != s_k:
        raise ValueError(f"sparse attention needs q_len == kv_len, got {s_q} and {s_k}")
    layout = plan_layout(int(window), bool(is_causal), s_q, chunk, int(block_size))
    band = _band_positions(layout, dim(q, 2), sinks, is_causal)
    if attn_mask is not None:
        gathered = _gather_mask(attn_mask, band.q_pos, band.k_pos, band.seq)
        is_bool = attn_mask.dtype == ir.DataType.BOOL
        mask_heads = static_dim(attn_mask, -3) if rank(attn_mask) >= 3 else 1
    else:
        gathered, is_bool, mask_heads = None, True, 1
    if mask_heads is None:
        raise ValueError("the head axis of an attention mask must be static (1 or the number of heads)")
    if opset >= ATTENTION_OPSET:
        return _chunks_through_attention_op(q, k, v, scale, layout, band, gathered, is_bool, mask_heads, softcap)
    return _chunks_through_matmul(q, k, v, scale, layout, band, gathered, is_bool, softcap)


@dataclass(frozen=True)
class _Band:
    """In-graph positions of one call: chunk b, query offset r, key column j."""

    seq: Value  # [S]
    n_chunks: Value  # [nb] = ceil(S / C)
    tail: Value  # [nb·C - S], the padding that makes S a multiple of C
    q_pos: Value  # (nb, C) query positions
    k_pos: Value  # (nb, K) key positions of each chunk's columns, sinks first; K = ns + nk·C
    visible: Value  # (nb, C, K) bool: the band, sinks, no padding, no key twice
    width: Value  # [K]


def _band_positions(layout: BandLayout, seq: Value, sinks: int, causal: bool) -> _Band:
    c, nk = layout.chunk, layout.key_chunks
    n_chunks = op.Div(op.Add(seq, ints(c - 1)), ints(c))
    tail = op.Sub(op.Mul(n_chunks, ints(c)), seq)
    b = op.Unsqueeze(op.Range(const(0), scalar(n_chunks), const(1)), ints(1))  # (nb, 1)
    q_pos = op.Add(op.Mul(b, ints(c)), const(np.arange(c)[None, :]))  # (nb, C)
    k_pos = op.Add(op.Mul(op.Sub(b, ints(layout.before)), ints(c)), const(np.arange(nk * c)[None, :]))  # (nb, nk·C)
    # Sink keys live in their own columns: exclude them from the window so none counts twice.
    in_seq = op.And(op.GreaterOrEqual(k_pos, ints(max(sinks, 0))), op.Less(k_pos, seq))
    visible = op.And(const(layout.band()[None]), op.Unsqueeze(in_seq, ints(1)))  # (nb, C, nk·C)
    if sinks <= 0:
        return _Band(seq, n_chunks, tail, q_pos, k_pos, visible, ints(nk * c))
    n_sinks = op.Min(seq, ints(sinks))
    sink_pos = op.Range(const(0), scalar(n_sinks), const(1))  # (ns,)
    if causal:
        sink_visible = op.LessOrEqual(op.Unsqueeze(sink_pos, ints(0, 1)), op.Unsqueeze(q_pos, ints(2)))
    else:
        sink_visible = op.Expand(const(np.array(True)), op.Concat(n_chunks, ints(c), n_sinks, axis=0))
    visible = op.Concat(sink_visible, visible, axis=2)
    k_pos = op.Concat(op.Expand(op.Unsqueeze(sink_pos, ints(0)), op.Concat(n_chunks, n_sinks, axis=0)), k_pos, axis=1)
    return _Band(seq, n_chunks, tail, q_pos, k_pos, visible, op.Add(n_sinks, ints(nk * c)))


def _chunks_through_attention_op(
    q: Value, k: Value, v: Value, scale: float, layout: BandLayout, band: _Band,
    gathered: Value | None, is_bool: bool, mask_heads: int, softcap: float = 0.0,
) -> Value:
    """Chunks as the batch of one ``Attention`` node over (batch·nb, tokens, heads·dim) inputs.

    In the 3-D (batch, seq, heads·dim) layout a chunk is a pure reshape of the
    sequence axis, GQA is the node's own ``kv_num_heads``, and only q, k, v
    and the output are transposed (S·H·D values each).
    """
    heads, kv_heads, c = static_dim(q, 1), static_dim(k, 1), layout.chunk
    batch, v_dim = dim(q, 0), dim(v, 3)
    q3, k3, v3 = (op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), ints(0, 0, -1)) for x in (q, k, v))
    q_width = op.Mul(ints(heads), dim(q, 3))
    k_width = op.Mul(ints(kv_heads), dim(k, 3))
    v_width = op.Mul(ints(kv_heads), v_dim)

    q_chunks = op.Reshape(op.Pad(q3, op.Concat(ints(0), band.tail, axis=0), None, ints(1)), op.Concat(ints(-1, c), q_width, axis=0))
    keys = op.Reshape(_key_rows(k3, band, 1), op.Concat(ints(-1), band.width, k_width, axis=0))
    values = op.Reshape(_key_rows(v3, band, 1), op.Concat(ints(-1), band.width, v_width, axis=0))

    if gathered is None:
        mask = op.Unsqueeze(band.visible, ints(0, 2))  # (1, nb, 1, C, K)
    else:
        if is_bool:
            mask = op.And(band.visible, gathered)
        else:
            # finfo.min entries off onnxruntime's sentinel: rows masked only by them attend evenly, as in PyTorch.
            mask = op.Where(band.visible, lowest_off_sentinel(op.CastLike(gathered, q), q.dtype), neg_inf_like(q))
        mask = op.Transpose(mask, perm=[0, 2, 1, 3, 4])  # (mb, nb, mh, C, K)
    # The batch axis of the node is (batch, chunk) flattened: the mask needs both.
    mask = op.Expand(mask, op.Concat(batch, ints(1, 1, 1, 1), axis=0))
    mask = op.Reshape(mask, op.Concat(ints(-1, mask_heads, c), band.width, axis=0))

    y, _, _, _ = op23.Attention(
        q_chunks, keys, values, mask, q_num_heads=heads, kv_num_heads=kv_heads, scale=float(scale),
        softcap=float(softcap),
    )
    y = op.Reshape(y, op.Concat(batch, ints(-1, heads), v_dim, axis=0))  # (B, nb·C, H, Dv)
    y = op.Slice(y, ints(0), band.seq, ints(1))
    return op.Transpose(y, perm=[0, 2, 1, 3])


def _chunks_through_matmul(
    q: Value, k: Value, v: Value, scale: float, layout: BandLayout, band: _Band,
    gathered: Value | None, is_bool: bool, softcap: float = 0.0,
) -> Value:
    """Chunks in a (B, H, nb, C, D) layout through MatMul / Where / Softmax / MatMul (opset < 23)."""
    heads, c = static_dim(q, 1), layout.chunk
    # Shapes are read from the op's inputs: values built inside the trace carry none.
    batch, v_dim = dim(q, 0), dim(v, 3)
    k = repeat_kv(k, heads)
    v = repeat_kv(v, heads)

    qs = op.Mul(q, op.CastLike(const(float(scale), "float32"), q))
    qs = op.Pad(qs, op.Concat(ints(0), band.tail, axis=0), None, ints(2))
    q_chunks = op.Reshape(qs, op.Concat(batch, ints(heads), band.n_chunks, ints(c), dim(q, 3), axis=0))
    keys = _key_rows(k, band, 2)  # (B, H, nb, K, D)
    values = _key_rows(v, band, 2)

    scores = soft_cap(op.MatMul(q_chunks, op.Transpose(keys, perm=[0, 1, 2, 4, 3])), softcap)  # (B, H, nb, C, K)
    visible = band.visible
    if gathered is not None:
        if is_bool:
            visible = op.And(visible, gathered)
        else:
            scores = op.Add(scores, op.CastLike(gathered, scores))
    scores = op.Where(visible, scores, neg_inf_like(scores))
    # Without a mask every real query sees itself; only padded rows can be empty and they are cut off.
    probs = masked_softmax(scores, guard_empty_rows=gathered is not None)
    out = op.MatMul(probs, values)  # (B, H, nb, C, Dv)
    out = op.Reshape(out, op.Concat(batch, ints(heads, -1), v_dim, axis=0))
    return op.Slice(out, ints(0), band.seq, ints(2))


def _key_rows(x: Value, band: _Band, axis: int) -> Value:
    """Each chunk's keys, sinks first, read along sequence axis ``axis``: (…, S, …) -> (…, nb, K, …).

    One ``Gather`` of the clamped key positions: a single copy of nb·K rows,
    with no padded copy of the keys and no slices to concatenate. Columns
    that fall outside the sequence are read at a clamped position and hidden
    by ``visible``.
    """
    return op.Gather(x, _clamp(band.k_pos, band.seq), axis=axis)


def _clamp(pos: Value, seq: Value) -> Value:
    """Positions clamped to [0, S - 1] (what padding columns read; ``visible`` hides them).

    One ``Clip`` with scalar bounds: a ``Min(Max(…))`` pair is rewritten by
    onnxscript 0.7's optimizer into a ``Clip`` whose bounds it never defines
    (an invalid model) when S is static.
    """
    return op.Clip(pos, const(np.array(0, dtype=np.int64)), scalar(op.Sub(seq, ints(1))))


def _gather_mask(mask: Value, q_pos: Value, k_pos: Value, seq: Value) -> Value:
    """The mask's entries at (q_pos, k_pos), shaped to broadcast against (B, H, nb, C, K).

    ``q_pos`` is (nb, C) and ``k_pos`` (nb, K). Positions past the sequence
    (padding) are clamped: their scores are hidden by ``visible`` anyway. A
    mask axis of static size 1 broadcasts and is not indexed, so a
    (B, 1, 1, S) padding mask is gathered along keys only, and a full
    (…, S, S) mask through its flattened last two axes — it is read, never
    copied whole.
    """
    q_idx = _clamp(q_pos, seq)
    k_idx = _clamp(k_pos, seq)
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


register_translation(
    torch.ops.attnrw.sparse_attention.default, sparse_translation, check=check_exportable, per_opset=True
)
