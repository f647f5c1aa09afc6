"""Flash-style Triton forward of ``attnrw::condensed_attention`` (the GPU path).

Same signature and rule as
:func:`attnrw.kernels.condense.reference.condensed_attention_torch`. The
summaries are pooled on the host in PyTorch
(:func:`~attnrw.kernels.condense.reference.summary_tables`: a few batched
matmuls); the kernel then does the attention. One program handles a tile of
``BLOCK_M`` queries inside one query block (of ``block_size``) for one
(batch, head) and visits, with one online softmax (fp32 accumulation):

1. the sinks ``[0, sinks)`` (causal: ``j <= i``), user mask read per pair;
2. the summary table of its query block (or the shared one), plus each
   summary's bias; a row sees group ``g`` when ``g < glo[i]`` or
   ``g > ghi[i]`` (and, for masks that vary along the queries, its own mask
   row allows some key of the group), visited as two spans;
3. the exact keys ``xs[i] <= j <= xe[i]``, user mask read per pair.

The per-query bounds come from :func:`attnrw.kernels.condense.layout.query_bounds`,
the same tensors the PyTorch path reads, so both agree to the key. Masks and
tables are read through their strides (0 along broadcast dimensions).

Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set
before this module is first imported). This module is imported only when
the Triton implementation is asked for; ``import attnrw`` never imports it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnrw.kernels.condense.layout import Geometry, check_inputs, query_bounds
from attnrw.kernels.condense.reference import row_groups, summary_tables
from attnrw.kernels.sparse.layout import cdiv
from attnrw.kernels.sparse.triton import LOG2E, pow2_at_least


@triton.jit
def _log2_units(x):
    """Additive mask values in log2 units. Values at or below -1e38 (``finfo.min`` masks) stay as
    they are: scaled they would overflow to -inf, and a row masked only that way would see
    nothing instead of attending uniformly as SDPA does."""
    return tl.where(x > -1.0e38, tl.maximum(x, -1.0e38) * 1.4426950408889634, x)


@triton.jit
def _attend_span(
    acc,
    m_i,
    l_i,
    q,
    offs_m,
    row_ok,
    start,
    stop,
    lo,
    hi,
    k_ptr,
    v_ptr,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    mask_ptr,
    stride_mm,
    stride_mn,
    bias_ptr,
    stride_bn,
    head_dim,
    v_dim,
    qk_scale,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Fold entries [start, stop) of a key/value run into the running softmax of one query tile.

    Entry j counts for row i when lo[i] <= j <= hi[i], the user mask allows
    (i, j) (HAS_MASK) and its bias is not -inf (HAS_BIAS: one additive value
    per entry, e.g. a summary's). Scores are in log2 units (qk_scale
    includes log2(e)) so the exponentials are exp2.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, V_DIM)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < stop
        kt = tl.load(
            k_ptr + offs_d[:, None] * stride_kd + offs_n[None, :].to(tl.int64) * stride_kn,
            mask=(offs_d[:, None] < head_dim) & col_ok[None, :],
            other=0.0,
        )
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        ok = row_ok[:, None] & col_ok[None, :] & (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None])
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n * stride_bn, mask=col_ok, other=float("-inf"))
            ok = ok & (b > float("-inf"))[None, :]
            s = s + _log2_units(b)[None, :]
        if HAS_MASK:
            mv = tl.load(
                mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn, mask=ok, other=0
            )
            if MASK_IS_BOOL:
                ok = ok & (mv != 0)
            else:
                s = s + _log2_units(mv.to(tl.float32))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing seen yet keeps m = -inf; shift by 0 then, not by -inf (NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(
            v_ptr + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
            mask=col_ok[:, None] & (offs_dv[None, :] < v_dim),
            other=0.0,
        )
        if DOT_FP32:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _condensed_fwd_kernel(
    Q,
    K,
    V,
    Mask,
    TK,
    TV,
    TB,
    RG,
    XS,
    XE,
    GLO,
    GHI,
    Out,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vz,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mz,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_tkz,
    stride_tkh,
    stride_tkq,
    stride_tkn,
    stride_tkd,
    stride_tvz,
    stride_tvh,
    stride_tvq,
    stride_tvn,
    stride_tvd,
    stride_tbz,
    stride_tbh,
    stride_tbq,
    stride_tbn,
    stride_rz,
    stride_rh,
    stride_rm,
    stride_rn,
    stride_oz,
    stride_oh,
    stride_om,
    stride_od,
    heads,
    group_q,
    table_group,
    seq_len,
    head_dim,
    v_dim,
    qk_scale,
    sinks,
    num_groups,
    block_size,
    tiles_per_block,
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Grid: (query tiles, batch * heads). Tile ``pid`` is sub-tile ``pid % tiles_per_block`` of query block ``pid // tiles_per_block``."""
    pid = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // heads).to(tl.int64)
    h = (zh % heads).to(tl.int64)
    kvh = h // group_q
    th = h // table_group  # the head whose summaries this head reads
    qb = pid // tiles_per_block
    row0 = qb * block_size + (pid % tiles_per_block) * BLOCK_M
    blk_stop = tl.minimum(qb * block_size + block_size, seq_len)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < blk_stop
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + z * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    k_ptr = K + z * stride_kz + kvh * stride_kh
    v_ptr = V + z * stride_vz + kvh * stride_vh
    mask_ptr = Mask + z * stride_mz + h * stride_mh
    xs = tl.load(XS + offs_m, mask=row_ok, other=seq_len)
    xe = tl.load(XE + offs_m, mask=row_ok, other=-1)
    glo = tl.load(GLO + offs_m, mask=row_ok, other=0)
    ghi = tl.load(GHI + offs_m, mask=row_ok, other=num_groups - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)
    n_sinks = tl.minimum(sinks, seq_len)
    zero = tl.zeros([BLOCK_M], dtype=tl.int32)

    # 1. Sinks (causal: j <= i).
    if IS_CAUSAL:
        sink_hi = offs_m
    else:
        sink_hi = zero + n_sinks - 1
    acc, m_i, l_i = _attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, 0, n_sinks, zero, sink_hi,
        k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, TB, 0,
        head_dim, v_dim, qk_scale, HAS_MASK, MASK_IS_BOOL, False, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    # 2. Summaries of the groups before (g < glo) and after (g > ghi) the exact region.
    tk_ptr = TK + z * stride_tkz + th * stride_tkh + qb * stride_tkq
    tv_ptr = TV + z * stride_tvz + th * stride_tvh + qb * stride_tvq
    tb_ptr = TB + z * stride_tbz + h * stride_tbh + qb * stride_tbq
    rg_ptr = RG + z * stride_rz + h * stride_rh  # which groups each query's own mask row allows
    before_stop = tl.max(tl.where(row_ok, glo, 0), 0)
    acc, m_i, l_i = _attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, 0, before_stop, zero, glo - 1,
        tk_ptr, tv_ptr, stride_tkn, stride_tkd, stride_tvn, stride_tvd, rg_ptr, stride_rm, stride_rn, tb_ptr, stride_tbn,
        head_dim, v_dim, qk_scale, HAS_ROWS, True, True, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    after_start = tl.min(tl.where(row_ok, ghi, num_groups - 1), 0) + 1
    acc, m_i, l_i = _attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, after_start, num_groups, ghi + 1, zero + num_groups - 1,
        tk_ptr, tv_ptr, stride_tkn, stride_tkd, stride_tvn, stride_tvd, rg_ptr, stride_rm, stride_rn, tb_ptr, stride_tbn,
        head_dim, v_dim, qk_scale, HAS_ROWS, True, True, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    # 3. Exact keys.
    exact_start = tl.min(tl.where(row_ok, xs, seq_len), 0)
    exact_stop = tl.max(tl.where(row_ok, xe, -1), 0) + 1
    acc, m_i, l_i = _attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, exact_start, exact_stop, xs, xe,
        k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, TB, 0,
        head_dim, v_dim, qk_scale, HAS_MASK, MASK_IS_BOOL, False, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip

    # Rows that saw no key (only through the user mask) output 0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    offs_dv = tl.arange(0, V_DIM)
    tl.store(
        Out + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dv[None, :] < v_dim),
    )


def _strides(t: torch.Tensor, broadcast: tuple[bool, ...]) -> list[int]:
    """Strides of ``t`` with 0 where a dimension is broadcast (size 1 standing for many)."""
    return [0 if b else s for s, b in zip(t.stride(), broadcast)]


def condensed_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    recent: int,
    group: int,
    sinks: int,
    pooling: str,
    size_bias: bool,
    block_size: int,
) -> torch.Tensor:
    """Host launcher: q (batch, heads, S, D), k (batch, kv_heads, S, D), v (batch, kv_heads, S, Dv) -> (batch, heads, S, Dv).

    The output is laid out as (batch, S, heads, Dv), like SDPA's. fp32 /
    fp16 / bf16; any length; head dims are padded to a power of two inside
    the kernel by masked loads. fp32 dots run in IEEE precision (no TF32) so
    the result matches the PyTorch path to ~1e-5. Memory: the summary tables
    hold (batch, heads, S / block_size, S / group, D) entries with query
    pooling or a mask that varies along the queries.
    """
    check_inputs(q, k, v, attn_mask, recent, group, sinks, pooling, block_size)
    batch, heads, seq_len, head_dim = q.shape
    v_dim = v.shape[-1]
    out = q.new_empty(batch, seq_len, heads, v_dim).transpose(1, 2)
    if seq_len == 0 or batch * heads == 0:
        return out
    geo = Geometry(seq_len, recent, group, sinks, bool(is_causal))
    xs, xe, glo, ghi = (t.to(torch.int32) for t in query_bounds(geo, q.device))
    ng = geo.num_groups
    if ng:
        tk, tv, tb = summary_tables(q, k, v, attn_mask, geo, scale, pooling, size_bias, block_size)
    else:  # no groups: nothing is read from the tables
        tk = q.new_zeros(batch, 1, 1, 1, head_dim)
        tv = q.new_zeros(batch, 1, 1, 1, v_dim)
        tb = torch.zeros(batch, 1, 1, 1, dtype=torch.float32, device=q.device)
    table_group = heads // tk.shape[1]
    tk_strides = _strides(tk, (False, False, tk.shape[2] == 1, False, False))
    tv_strides = _strides(tv, (False, False, tv.shape[2] == 1, False, False))
    tb_strides = _strides(tb, (False, tb.shape[1] == 1, tb.shape[2] == 1, False))
    rows_t, rows_strides = q, (0, 0, 0, 0)
    if attn_mask is None:
        mask_t, mask_strides, is_bool = q, (0, 0, 0, 0), False
    else:
        m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        m4 = m4.expand(batch, heads, seq_len, seq_len)  # a view: broadcast dims get stride 0
        is_bool = m4.dtype == torch.bool
        mask_t = m4.view(torch.uint8) if is_bool else m4
        mask_strides = mask_t.stride()
        m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        rows = [row_groups(m4[b], geo) for b in range(m4.shape[0])]
        if rows[0] is not None and ng:
            rows_t = torch.stack(rows).view(torch.uint8)
            rows_strides = _strides(rows_t, tuple(n == 1 for n in rows_t.shape))

    # Triton's interpreter multiplies the raw bits of bfloat16 dot operands (triton#11584,
    # "not supported yet"): there, and only there, run the dots in fp32 (exact upcast).
    dot_fp32 = q.dtype == torch.bfloat16 and q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    block_m = min(pow2_at_least(block_size, 16), 64)
    head_dim_p, v_dim_p = pow2_at_least(head_dim, 16), pow2_at_least(v_dim, 16)
    block_n = 64 if max(head_dim_p, v_dim_p) <= 64 else 32
    tiles_per_block = cdiv(block_size, block_m)
    num_blocks = cdiv(seq_len, block_size)

    def grid(meta: dict) -> tuple[int, int]:
        return (num_blocks * triton.cdiv(block_size, meta["BLOCK_M"]), batch * heads)

    _condensed_fwd_kernel[grid](
        q, k, v, mask_t, tk, tv, tb, rows_t, xs, xe, glo, ghi, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *tk_strides, *tv_strides, *tb_strides, *rows_strides,
        *out.stride(),
        heads, heads // k.shape[1], table_group, seq_len, head_dim, v_dim, float(scale) * LOG2E,
        sinks, ng, block_size, tiles_per_block,
        IS_CAUSAL=bool(is_causal),
        HAS_MASK=attn_mask is not None,
        MASK_IS_BOOL=is_bool,
        HAS_ROWS=rows_t is not q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim_p,
        V_DIM=v_dim_p,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32",
        DOT_FP32=dot_fp32,
        num_warps=4,
        num_stages=2,
    )  # fmt: skip
    return out
