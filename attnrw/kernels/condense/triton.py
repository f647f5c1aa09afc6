"""Flash-style Triton forward of ``attnrw::condensed_attention`` (the GPU path).

Same signature and rule as
:func:`attnrw.kernels.condense.reference.condensed_attention_torch`. The
summaries are pooled on the host in PyTorch
(:func:`~attnrw.kernels.condense.summaries.summary_tables`: a few batched
matmuls, the pooling the PyTorch path runs); the kernel then does the
attention, every run folded in by the one attend loop,
:func:`attnrw.kernels.common.triton.attend_span`. One program handles a tile of
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

import torch
import triton
import triton.language as tl

from attnrw.kernels.common.layout import empty_sdpa_layout
from attnrw.kernels.common.shapes import as_4d, cdiv
from attnrw.kernels.common.triton import (
    LOG2E,
    attend_span,
    block_tile,
    load_rows,
    mask_operand,
    program_head,
    softmax_state,
    store_rows,
    tiles,
)
from attnrw.kernels.condense.layout import Geometry, check_inputs, query_bounds
from attnrw.kernels.condense.summaries import row_groups, summary_tables


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
    """Grid: (query tiles, batch * heads); see :func:`attnrw.kernels.common.triton.block_tile`."""
    pid = tl.program_id(0)
    z, h, kvh = program_head(heads, group_q)
    th = h // table_group  # the head whose summaries this head reads
    qb, row0, offs_m, row_ok = block_tile(pid, block_size, seq_len, tiles_per_block, BLOCK_M)
    q = load_rows(Q + z * stride_qz + h * stride_qh, offs_m, row_ok, stride_qm, stride_qd, head_dim, HEAD_DIM, DOT_FP32)
    k_ptr = K + z * stride_kz + kvh * stride_kh
    v_ptr = V + z * stride_vz + kvh * stride_vh
    mask_ptr = Mask + z * stride_mz + h * stride_mh
    xs = tl.load(XS + offs_m, mask=row_ok, other=seq_len)
    xe = tl.load(XE + offs_m, mask=row_ok, other=-1)
    glo = tl.load(GLO + offs_m, mask=row_ok, other=0)
    ghi = tl.load(GHI + offs_m, mask=row_ok, other=num_groups - 1)

    acc, m_i, l_i = softmax_state(BLOCK_M, V_DIM)
    n_sinks = tl.minimum(sinks, seq_len)
    zero = tl.zeros([BLOCK_M], dtype=tl.int32)

    # 1. Sinks (causal: j <= i).
    if IS_CAUSAL:
        sink_hi = offs_m
    else:
        sink_hi = zero + n_sinks - 1
    acc, m_i, l_i = attend_span(
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
    acc, m_i, l_i = attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, 0, before_stop, zero, glo - 1,
        tk_ptr, tv_ptr, stride_tkn, stride_tkd, stride_tvn, stride_tvd, rg_ptr, stride_rm, stride_rn, tb_ptr, stride_tbn,
        head_dim, v_dim, qk_scale, HAS_ROWS, True, True, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    after_start = tl.min(tl.where(row_ok, ghi, num_groups - 1), 0) + 1
    acc, m_i, l_i = attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, after_start, num_groups, ghi + 1, zero + num_groups - 1,
        tk_ptr, tv_ptr, stride_tkn, stride_tkd, stride_tvn, stride_tvd, rg_ptr, stride_rm, stride_rn, tb_ptr, stride_tbn,
        head_dim, v_dim, qk_scale, HAS_ROWS, True, True, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    # 3. Exact keys.
    exact_start = tl.min(tl.where(row_ok, xs, seq_len), 0)
    exact_stop = tl.max(tl.where(row_ok, xe, -1), 0) + 1
    acc, m_i, l_i = attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, exact_start, exact_stop, xs, xe,
        k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, TB, 0,
        head_dim, v_dim, qk_scale, HAS_MASK, MASK_IS_BOOL, False, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip

    # Rows that saw no key (only through the user mask) output 0.
    store_rows(Out + z * stride_oz + h * stride_oh, acc, l_i, offs_m, row_ok, stride_om, stride_od, v_dim, V_DIM)


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
    out = empty_sdpa_layout(q, v_dim)
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
    mask_t, mask_strides, is_bool = mask_operand(attn_mask, q, (batch, heads, seq_len, seq_len))
    if attn_mask is not None:
        m4 = as_4d(attn_mask)
        rows = [row_groups(m4[b], geo) for b in range(m4.shape[0])]
        if rows[0] is not None and ng:
            rows_t = torch.stack(rows).view(torch.uint8)
            rows_strides = _strides(rows_t, tuple(n == 1 for n in rows_t.shape))
    cfg = tiles(q, block_size, head_dim, v_dim)
    tiles_per_block = cdiv(block_size, cfg.block_m)
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
        **cfg.meta(),
    )  # fmt: skip
    return out
