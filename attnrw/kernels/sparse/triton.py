"""Flash-style Triton forward of ``attnrw::sparse_attention`` (the GPU path).

Same signature and rule as
:func:`attnrw.kernels.sparse.reference.sparse_attention_torch`. One program
handles a tile of ``BLOCK_M`` queries inside one query block (of
``block_size``) for one (batch, head), and visits only the keys that block
needs, in three disjoint ranges: the sinks ``[0, sinks)``, the band of the
tile (minus the sinks), and the top-k key blocks chosen on the host by
:func:`attnrw.kernels.sparse.layout.select_blocks` (passed as an index
tensor; the choice excludes blocks touching the band or the sinks, so no key
is counted twice). Each range is folded in by the one attend loop,
:func:`attnrw.kernels.common.triton.attend_span` (online softmax, fp32
accumulation); per-row bounds give the band edges and causality, and the
user mask is read through its strides (0 along broadcast dimensions).

Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set
before this module is first imported). This module is imported only when
the Triton implementation is asked for; ``import attnrw`` never imports it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrw.kernels.common.shapes import cdiv
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
from attnrw.kernels.sparse.layout import check_inputs, select_blocks


@triton.jit
def _sparse_fwd_kernel(
    Q,
    K,
    V,
    Mask,
    Blocks,
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
    stride_bz,
    stride_bh,
    stride_bm,
    stride_bk,
    stride_oz,
    stride_oh,
    stride_om,
    stride_od,
    heads,
    group,
    seq_len,
    head_dim,
    v_dim,
    qk_scale,
    window,
    sinks,
    block_size,
    topk,
    tiles_per_block,
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Grid: (query tiles, batch * heads); see :func:`attnrw.kernels.common.triton.block_tile`."""
    pid = tl.program_id(0)
    z, h, kvh = program_head(heads, group)
    qb, row0, offs_m, row_ok = block_tile(pid, block_size, seq_len, tiles_per_block, BLOCK_M)
    q = load_rows(Q + z * stride_qz + h * stride_qh, offs_m, row_ok, stride_qm, stride_qd, head_dim, HEAD_DIM, DOT_FP32)
    k_ptr = K + z * stride_kz + kvh * stride_kh
    v_ptr = V + z * stride_vz + kvh * stride_vh
    mask_ptr = Mask + z * stride_mz + h * stride_mh

    acc, m_i, l_i = softmax_state(BLOCK_M, V_DIM)
    zero = tl.zeros([BLOCK_M], dtype=tl.int32)
    # The last key a row may see outside its band (sinks, top-k blocks): causality only.
    if IS_CAUSAL:
        last = offs_m
    else:
        last = zero + seq_len - 1
    n_sinks = tl.minimum(sinks, seq_len)

    # 1. Sinks: keys [0, sinks), causality only.
    acc, m_i, l_i = attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, 0, n_sinks, zero, last,
        k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Mask, 0,
        head_dim, v_dim, qk_scale, HAS_MASK, MASK_IS_BOOL, False, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    # 2. The tile's band, without the sinks (counted above): i - back <= j <= i + ahead.
    if IS_CAUSAL:
        back = window - 1
        ahead = 0
    else:
        back = window // 2
        ahead = window // 2
    tile_last = tl.max(tl.where(row_ok, offs_m, row0), 0)
    lo = tl.maximum(row0 - back, n_sinks)
    hi = tl.minimum(tile_last + ahead, seq_len - 1)
    acc, m_i, l_i = attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, lo, hi + 1, offs_m - back, offs_m + ahead,
        k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Mask, 0,
        head_dim, v_dim, qk_scale, HAS_MASK, MASK_IS_BOOL, False, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    # 3. Top-k key blocks of this query block (-1 = no block); disjoint from 1 and 2 by construction.
    blk_ptr = Blocks + z * stride_bz + h * stride_bh + qb * stride_bm
    for t in range(0, topk):
        kb = tl.load(blk_ptr + t * stride_bk)
        start = kb * block_size
        stop = tl.where(kb >= 0, tl.minimum(start + block_size, seq_len), start)
        acc, m_i, l_i = attend_span(
            acc, m_i, l_i, q, offs_m, row_ok, start, stop, zero, last,
            k_ptr, v_ptr, stride_kn, stride_kd, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn, Mask, 0,
            head_dim, v_dim, qk_scale, HAS_MASK, MASK_IS_BOOL, False, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
        )  # fmt: skip

    # Rows that saw no key (only through the user mask) output 0.
    store_rows(Out + z * stride_oz + h * stride_oh, acc, l_i, offs_m, row_ok, stride_om, stride_od, v_dim, V_DIM)


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    window: int,
    sinks: int,
    topk: int,
    block_size: int,
) -> torch.Tensor:
    """Host launcher: q (batch, heads, S, D), k (batch, kv_heads, S, D), v (batch, kv_heads, S, Dv) -> (batch, heads, S, Dv).

    fp32 / fp16 / bf16; any length; head dims are padded to a power of two
    inside the kernel by masked loads. fp32 dots run in IEEE precision (no
    TF32) so the result matches the PyTorch path to ~1e-5.
    """
    check_inputs(q, k, v, attn_mask, window, sinks, topk, block_size)
    batch, heads, seq_len, head_dim = q.shape
    v_dim = v.shape[-1]
    out = torch.empty((batch, heads, seq_len, v_dim), dtype=q.dtype, device=q.device)
    if seq_len == 0 or batch * heads == 0:
        return out

    blocks = select_blocks(q, k, topk, block_size, window, sinks, is_causal)
    kk = 0 if blocks is None else blocks.shape[-1]
    blocks_t = (
        torch.zeros((1, 1, 1, 1), dtype=torch.int32, device=q.device)
        if blocks is None
        else blocks.to(torch.int32).contiguous()
    )
    mask_t, mask_strides, is_bool = mask_operand(attn_mask, q, (batch, heads, seq_len, seq_len))
    cfg = tiles(q, block_size, head_dim, v_dim)
    tiles_per_block = cdiv(block_size, cfg.block_m)
    num_blocks = cdiv(seq_len, block_size)

    def grid(meta: dict) -> tuple[int, int]:
        return (num_blocks * triton.cdiv(block_size, meta["BLOCK_M"]), batch * heads)

    _sparse_fwd_kernel[grid](
        q, k, v, mask_t, blocks_t, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *blocks_t.stride(), *out.stride(),
        heads, heads // k.shape[1], seq_len, head_dim, v_dim, float(scale) * LOG2E,
        window, sinks, block_size, kk, tiles_per_block,
        IS_CAUSAL=bool(is_causal),
        HAS_MASK=attn_mask is not None,
        MASK_IS_BOOL=is_bool,
        **cfg.meta(),
    )  # fmt: skip
    return out
