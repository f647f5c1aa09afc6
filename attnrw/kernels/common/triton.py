"""The one Triton attend loop of the attention kernels, and the host-side helpers of their launchers.

Every kernel (sparse, condensed, merged) runs flash-style: one program
holds a tile of ``BLOCK_M`` query rows of one (batch, head) and folds runs
of keys into an online softmax with fp32 accumulation
(:func:`attend_span`). Scores are in log2 units (``qk_scale`` includes
log2(e)) so the exponentials are ``exp2``. Offsets along the key axis are
int64, so runs longer than 2³¹ / stride elements address correctly.

Additive mask and bias values go through :func:`log2_units`: values at or
below -1e38 (``torch.finfo(torch.float32).min`` masks) are kept as they are
instead of scaled, since scaled they would overflow to -inf and a row
masked only that way would see nothing instead of attending uniformly, as
``F.scaled_dot_product_attention`` and the PyTorch paths do.

Imports triton: only the ``triton.py`` modules of the kernel packages
import this, and only when the Triton implementation is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from attnrw.kernels.common.shapes import as_4d

LOG2E = 1.4426950408889634


@triton.jit
def log2_units(x):
    """Additive mask values in log2 units; values at or below -1e38 (``finfo.min`` masks) stay as they are."""
    return tl.where(x > -1.0e38, tl.maximum(x, -1.0e38) * 1.4426950408889634, x)


@triton.jit
def attend_span(
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

    Entry j counts for row i when lo[i] <= j <= hi[i] (the op's rule: a
    band, causality, an exact interval), the user mask allows (i, j)
    (HAS_MASK: read at ``mask_ptr + i·stride_mm + j·stride_mn``, bool or
    additive) and its bias is not -inf (HAS_BIAS: one additive value per
    entry, e.g. a summary's). Returns the new (acc, m_i, l_i).
    """
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, V_DIM)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < stop
        offs_n64 = offs_n.to(tl.int64)
        kt = tl.load(
            k_ptr + offs_d[:, None] * stride_kd + offs_n64[None, :] * stride_kn,
            mask=(offs_d[:, None] < head_dim) & col_ok[None, :],
            other=0.0,
        )
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        ok = row_ok[:, None] & col_ok[None, :] & (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None])
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n64 * stride_bn, mask=col_ok, other=float("-inf"))
            ok = ok & (b > float("-inf"))[None, :]
            s = s + log2_units(b)[None, :]
        if HAS_MASK:
            mv = tl.load(
                mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_n64[None, :] * stride_mn, mask=ok, other=0
            )
            if MASK_IS_BOOL:
                ok = ok & (mv != 0)
            else:
                s = s + log2_units(mv.to(tl.float32))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing seen yet keeps m = -inf; shift by 0 then, not by -inf (NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(
            v_ptr + offs_n64[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=col_ok[:, None] & (offs_dv[None, :] < v_dim),
            other=0.0,
        )
        if DOT_FP32:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def program_head(heads, group):
    """The (batch, head, kv head) of this program, from grid axis 1 (batch * heads); int64 for the offsets."""
    zh = tl.program_id(1)
    z = (zh // heads).to(tl.int64)
    h = (zh % heads).to(tl.int64)
    return z, h, h // group


@triton.jit
def softmax_state(BLOCK_M: tl.constexpr, V_DIM: tl.constexpr):
    """The empty running softmax of a tile: (acc (BLOCK_M, V_DIM), running max m_i, running sum l_i), fp32."""
    acc = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return acc, m_i, l_i


@triton.jit
def block_tile(pid, block_size, seq_len, tiles_per_block, BLOCK_M: tl.constexpr):
    """Tile ``pid`` is sub-tile ``pid % tiles_per_block`` of query block ``pid // tiles_per_block``.

    Returns (query block, first row, row offsets (BLOCK_M,), which rows are in the block).
    """
    qb = pid // tiles_per_block
    row0 = qb * block_size + (pid % tiles_per_block) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    return qb, row0, offs_m, offs_m < tl.minimum(qb * block_size + block_size, seq_len)


@triton.jit
def load_rows(ptr, offs_m, row_ok, stride_m, stride_d, dim, DIM: tl.constexpr, DOT_FP32: tl.constexpr):
    """The (BLOCK_M, DIM) tile of rows ``offs_m`` (zero past ``dim`` and on rows not ``row_ok``)."""
    offs_d = tl.arange(0, DIM)
    x = tl.load(
        ptr + offs_m[:, None].to(tl.int64) * stride_m + offs_d[None, :] * stride_d,
        mask=row_ok[:, None] & (offs_d[None, :] < dim),
        other=0.0,
    )
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def store_rows(ptr, acc, l_i, offs_m, row_ok, stride_m, stride_d, dim, DIM: tl.constexpr):
    """Normalise the tile's accumulator by its softmax sums and store it; rows that saw no key get 0."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    offs_d = tl.arange(0, DIM)
    tl.store(
        ptr + offs_m[:, None].to(tl.int64) * stride_m + offs_d[None, :] * stride_d,
        out.to(ptr.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < dim),
    )


def pow2_at_least(n: int, lo: int) -> int:
    """The smallest power of two >= max(n, lo) (tl.dot needs power-of-two tiles of at least 16)."""
    return max(lo, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class Tiles:
    """The compile-time tile sizes and dot settings of one launch."""

    block_m: int
    block_n: int
    head_dim: int  # padded to a power of two; loads mask the rest
    v_dim: int
    dot_precision: str
    dot_fp32: bool

    def meta(self) -> dict[str, Any]:
        """The launch keywords every attention kernel takes."""
        return dict(
            BLOCK_M=self.block_m,
            BLOCK_N=self.block_n,
            HEAD_DIM=self.head_dim,
            V_DIM=self.v_dim,
            DOT_PRECISION=self.dot_precision,
            DOT_FP32=self.dot_fp32,
            num_warps=4,
            num_stages=2,
        )


def tiles(q: torch.Tensor, rows: int, head_dim: int, v_dim: int) -> Tiles:
    """Tile sizes for queries ``q`` whose programs hold at most ``rows`` rows (a query block, or all of q_len).

    fp32 dots run in IEEE precision (no TF32), so results match the PyTorch
    paths to ~1e-5. Triton's interpreter multiplies the raw bits of
    bfloat16 dot operands (triton#11584, "not supported yet"): there, and
    only there, the dots run in fp32 (an exact upcast).
    """
    dot_fp32 = q.dtype == torch.bfloat16 and q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    head_dim_p, v_dim_p = pow2_at_least(head_dim, 16), pow2_at_least(v_dim, 16)
    return Tiles(
        block_m=min(pow2_at_least(rows, 16), 64),
        block_n=64 if max(head_dim_p, v_dim_p) <= 64 else 32,
        head_dim=head_dim_p,
        v_dim=v_dim_p,
        dot_precision="ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32",
        dot_fp32=dot_fp32,
    )


def mask_operand(
    attn_mask: torch.Tensor | None, q: torch.Tensor, shape: tuple[int, int, int, int]
) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """The mask as a kernel reads it: (tensor, 4-D strides for ``shape``, whether it is bool).

    A view, no copy: broadcast dimensions get stride 0, a bool mask is read
    as uint8. Without a mask, ``q`` stands in (never read) with strides 0.
    """
    if attn_mask is None:
        return q, (0, 0, 0, 0), False
    m4 = as_4d(attn_mask).expand(*shape)
    is_bool = m4.dtype == torch.bool
    t = m4.view(torch.uint8) if is_bool else m4
    return t, t.stride(), is_bool
