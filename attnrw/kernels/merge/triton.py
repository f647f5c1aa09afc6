"""Flash-style Triton attention with an additive bias per (query, key): the GPU path of ``attnrw::merged_attention``.

The merge itself (matching, averaging, bias) is dense PyTorch ops in
:mod:`attnrw.kernels.merge.reference`; this kernel replaces SDPA for the
attention on the merged tokens. The bias (the proportional-attention
``log(size)`` and the merged mask) is read through its strides, 0 along
broadcast dimensions, so a per-key bias (batch, 1, 1, M) is never expanded.
One program handles ``BLOCK_M`` queries of one (batch, head) with an
online softmax in fp32 over all keys; the inner loop is the one attend loop
of every kernel, :func:`attnrw.kernels.common.triton.attend_span`, with no
band limit.

Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set
before this module is first imported). Imported only when the Triton
implementation is asked for; ``import attnrw`` never imports it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnrw.kernels.common.layout import empty_sdpa_layout
from attnrw.kernels.common.triton import (
    LOG2E,
    attend_span,
    load_rows,
    mask_operand,
    program_head,
    softmax_state,
    store_rows,
    tiles,
)


@triton.jit
def _biased_fwd_kernel(
    Q,
    K,
    V,
    Bias,
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
    stride_bz,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_oz,
    stride_oh,
    stride_om,
    stride_od,
    heads,
    group,
    q_len,
    kv_len,
    head_dim,
    v_dim,
    qk_scale,
    HAS_BIAS: tl.constexpr,
    BIAS_IS_BOOL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Grid: (query tiles, batch * heads)."""
    pid = tl.program_id(0)
    z, h, kvh = program_head(heads, group)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    q = load_rows(Q + z * stride_qz + h * stride_qh, offs_m, row_ok, stride_qm, stride_qd, head_dim, HEAD_DIM, DOT_FP32)
    acc, m_i, l_i = softmax_state(BLOCK_M, V_DIM)
    # No band: every row may see every key.
    zero = tl.zeros([BLOCK_M], dtype=tl.int32)
    acc, m_i, l_i = attend_span(
        acc, m_i, l_i, q, offs_m, row_ok, 0, kv_len, zero, zero + kv_len - 1,
        K + z * stride_kz + kvh * stride_kh, V + z * stride_vz + kvh * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd,
        Bias + z * stride_bz + h * stride_bh, stride_bm, stride_bn, Bias, 0,
        head_dim, v_dim, qk_scale, HAS_BIAS, BIAS_IS_BOOL, False, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    # Rows that saw no key (their bias is -inf everywhere) output 0.
    store_rows(Out + z * stride_oz + h * stride_oh, acc, l_i, offs_m, row_ok, stride_om, stride_od, v_dim, V_DIM)


def biased_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v: q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> (B, H, Sq, Dv).

    ``bias`` None, additive float or bool (True = may attend), broadcastable
    to (B, H, Sq, Sk). The output is laid out as (B, Sq, H, Dv), like SDPA's.
    fp32 / fp16 / bf16; fp32 dots run in IEEE precision (no TF32). Bias values at
    or below -1e38 (``finfo.min``) count as very negative, not as -inf, as in SDPA.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_len, v_dim = k.shape[-2], v.shape[-1]
    out = empty_sdpa_layout(q, v_dim)
    if q_len == 0 or batch * heads == 0:
        return out
    if kv_len == 0:
        return out.zero_()
    bias_t, bias_strides, is_bool = mask_operand(bias, q, (batch, heads, q_len, kv_len))
    cfg = tiles(q, q_len, head_dim, v_dim)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    _biased_fwd_kernel[grid](
        q, k, v, bias_t, out,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *out.stride(),
        heads, heads // k.shape[1], q_len, kv_len, head_dim, v_dim, float(scale) * LOG2E,
        HAS_BIAS=bias is not None,
        BIAS_IS_BOOL=is_bool,
        **cfg.meta(),
    )  # fmt: skip
    return out
