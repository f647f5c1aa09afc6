"""Flash-style Triton attention with an additive bias per (query, key): the GPU path of ``attnrw::merged_attention``.

The merge itself (matching, averaging, bias) is dense PyTorch ops in
:mod:`attnrw.kernels.merge.reference`; this kernel replaces SDPA for the
attention on the merged tokens. The bias (the proportional-attention
``log(size)`` and the merged mask) is read through its strides, 0 along
broadcast dimensions, so a per-key bias (batch, 1, 1, M) is never expanded.
One program handles ``BLOCK_M`` queries of one (batch, head) with an
online softmax in fp32 over all keys; the inner loop is the sparse kernel's
:func:`attnrw.kernels.sparse.triton.attend_range` with no band limit.

Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set
before this module is first imported). Imported only when the Triton
implementation is asked for; ``import attnrw`` never imports it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from attnrw.kernels.attention.op import empty_sdpa_layout
from attnrw.kernels.merge.plan import as_4d
from attnrw.kernels.sparse.triton import LOG2E, attend_range, pow2_at_least


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
    zh = tl.program_id(1)
    z = (zh // heads).to(tl.int64)
    h = (zh % heads).to(tl.int64)
    kvh = h // group
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + z * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)
    # No band: every key is within this distance of every query.
    far = tl.maximum(q_len, kv_len)
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, offs_m, row_ok, 0, kv_len, far, far,
        K + z * stride_kz + kvh * stride_kh, V + z * stride_vz + kvh * stride_vh,
        Bias + z * stride_bz + h * stride_bh,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
        head_dim, v_dim, qk_scale, HAS_BIAS, BIAS_IS_BOOL, BLOCK_N, HEAD_DIM, V_DIM, DOT_PRECISION, DOT_FP32,
    )  # fmt: skip
    # Rows that saw no key (their bias is -inf everywhere) output 0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    offs_dv = tl.arange(0, V_DIM)
    tl.store(
        Out + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dv[None, :] < v_dim),
    )


def biased_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v: q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> (B, H, Sq, Dv).

    ``bias`` None, additive float or bool (True = may attend), broadcastable
    to (B, H, Sq, Sk). The output is laid out as (B, Sq, H, Dv), like SDPA's.
    fp32 / fp16 / bf16; fp32 dots run in IEEE precision (no TF32).
    """
    batch, heads, q_len, head_dim = q.shape
    kv_len, v_dim = k.shape[-2], v.shape[-1]
    out = empty_sdpa_layout(q, v_dim)
    if q_len == 0 or batch * heads == 0:
        return out
    if kv_len == 0:
        return out.zero_()
    if bias is None:
        bias_t, bias_strides, is_bool = q, (0, 0, 0, 0), False
    else:
        b4 = as_4d(bias).expand(batch, heads, q_len, kv_len)  # a view: broadcast dims get stride 0
        is_bool = b4.dtype == torch.bool
        bias_t = b4.view(torch.uint8) if is_bool else b4
        bias_strides = bias_t.stride()

    # Triton's interpreter multiplies the raw bits of bfloat16 dot operands (triton#11584):
    # there, and only there, run the dots in fp32 (exact upcast), as the sparse kernel does.
    dot_fp32 = q.dtype == torch.bfloat16 and q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    block_m = min(pow2_at_least(q_len, 16), 64)
    head_dim_p, v_dim_p = pow2_at_least(head_dim, 16), pow2_at_least(v_dim, 16)
    block_n = 64 if max(head_dim_p, v_dim_p) <= 64 else 32

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    _biased_fwd_kernel[grid](
        q, k, v, bias_t, out,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *out.stride(),
        heads, heads // k.shape[1], q_len, kv_len, head_dim, v_dim, float(scale) * LOG2E,
        HAS_BIAS=bias is not None,
        BIAS_IS_BOOL=is_bool,
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
