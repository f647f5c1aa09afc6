"""Flash-style Triton forward of ``attnrw::sparse_attention`` (the GPU path).

Same signature and rule as
:func:`attnrw.kernels.sparse.reference.sparse_attention_torch`. One program
handles a tile of ``BLOCK_M`` queries inside one query block (of
``block_size``) for one (batch, head), and visits only the keys that block
needs, in three disjoint ranges: the sinks ``[0, sinks)``, the band of the
tile (minus the sinks), and the top-k key blocks chosen on the host by
:func:`attnrw.kernels.sparse.layout.select_blocks` (passed as an index
tensor; the choice excludes blocks touching the band or the sinks, so no key
is counted twice). Online softmax with fp32 accumulation; inside each range
an exact per-element test gives the band edges and causality, and the user
mask is read through its strides (0 along broadcast dimensions).

Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set
before this module is first imported). This module is imported only when
the Triton implementation is asked for; ``import attnrw`` never imports it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnrw.kernels.sparse.layout import cdiv, check_inputs, select_blocks

LOG2E = 1.4426950408889634


@triton.jit
def attend_range(
    acc,
    m_i,
    l_i,
    q,
    offs_m,
    row_ok,
    start,
    stop,
    back,
    ahead,
    k_ptr,
    v_ptr,
    mask_ptr,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mm,
    stride_mn,
    head_dim,
    v_dim,
    qk_scale,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Fold keys [start, stop) into the running softmax of one query tile.

    A key j counts for query i when i - j <= back and j - i <= ahead (the band
    edges and causality), and the user mask allows it. Scores are in log2
    units (qk_scale includes log2(e)) so the exponentials are exp2.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, V_DIM)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < stop
        kt = tl.load(
            k_ptr + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
            mask=(offs_d[:, None] < head_dim) & col_ok[None, :],
            other=0.0,
        )
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        diff = offs_m[:, None] - offs_n[None, :]
        ok = row_ok[:, None] & col_ok[None, :] & (diff <= back) & (-diff <= ahead)
        if HAS_MASK:
            mv = tl.load(
                mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn, mask=ok, other=0
            )
            if MASK_IS_BOOL:
                ok = ok & (mv != 0)
            else:
                s = s + mv.to(tl.float32) * 1.4426950408889634
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing seen yet keeps m = -inf; shift by 0 then, not by -inf (NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(
            v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=col_ok[:, None] & (offs_dv[None, :] < v_dim),
            other=0.0,
        )
        if DOT_FP32:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


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
    """Grid: (query tiles, batch * heads). Tile ``pid`` is sub-tile ``pid % tiles_per_block`` of query block ``pid // tiles_per_block``."""
    pid = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // heads).to(tl.int64)
    h = (zh % heads).to(tl.int64)
    kvh = h // group
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)
    far = seq_len  # a distance no pair of positions reaches: "no limit"
    if IS_CAUSAL:
        ahead_any = 0
    else:
        ahead_any = far
    n_sinks = tl.minimum(sinks, seq_len)
    tile_last = tl.minimum(row0 + BLOCK_M, blk_stop) - 1

    # 1. Sinks: keys [0, sinks), causality only.
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, offs_m, row_ok, 0, n_sinks, far, ahead_any,
        k_ptr, v_ptr, mask_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        head_dim, v_dim, qk_scale, HAS_MASK, MASK_IS_BOOL, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    # 2. The tile's band, without the sinks (counted above).
    if IS_CAUSAL:
        back = window - 1
        ahead = 0
    else:
        back = window // 2
        ahead = window // 2
    lo = tl.maximum(row0 - back, n_sinks)
    hi = tl.minimum(tile_last + ahead, seq_len - 1)
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, offs_m, row_ok, lo, hi + 1, back, ahead,
        k_ptr, v_ptr, mask_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        head_dim, v_dim, qk_scale, HAS_MASK, MASK_IS_BOOL, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    # 3. Top-k key blocks of this query block (-1 = no block); disjoint from 1 and 2 by construction.
    blk_ptr = Blocks + z * stride_bz + h * stride_bh + qb * stride_bm
    for t in range(0, topk):
        kb = tl.load(blk_ptr + t * stride_bk)
        start = kb * block_size
        stop = tl.where(kb >= 0, tl.minimum(start + block_size, seq_len), start)
        acc, m_i, l_i = attend_range(
            acc, m_i, l_i, q, offs_m, row_ok, start, stop, far, ahead_any,
            k_ptr, v_ptr, mask_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
            head_dim, v_dim, qk_scale, HAS_MASK, MASK_IS_BOOL, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
        )  # fmt: skip

    # Rows that saw no key (only through the user mask) output 0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    offs_dv = tl.arange(0, V_DIM)
    tl.store(
        Out + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dv[None, :] < v_dim),
    )


def pow2_at_least(n: int, lo: int) -> int:
    """The smallest power of two >= max(n, lo) (tl.dot needs power-of-two tiles of at least 16)."""
    return max(lo, 1 << max(0, n - 1).bit_length())


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
    if attn_mask is None:
        mask_t, mask_strides, is_bool = q, (0, 0, 0, 0), False
    else:
        m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        m4 = m4.expand(batch, heads, seq_len, seq_len)  # a view: broadcast dims get stride 0
        is_bool = m4.dtype == torch.bool
        mask_t = m4.view(torch.uint8) if is_bool else m4
        mask_strides = mask_t.stride()

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

    _sparse_fwd_kernel[grid](
        q, k, v, mask_t, blocks_t, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *blocks_t.stride(), *out.stride(),
        heads, heads // k.shape[1], seq_len, head_dim, v_dim, float(scale) * LOG2E,
        window, sinks, block_size, kk, tiles_per_block,
        IS_CAUSAL=bool(is_causal),
        HAS_MASK=attn_mask is not None,
        MASK_IS_BOOL=is_bool,
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
