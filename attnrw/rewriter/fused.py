"""Decompositions of PyTorch's fused inference fast paths into plain ops with SDPA.

``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take single fused
ops in inference (``_native_multi_head_attention``,
``_transformer_encoder_layer_fwd``) that hide the attention. ``torch.export``
never shows them; ``torch.compile`` may. Spelled out here in the same maths,
the attention inside is an SDPA call the matcher finds like any other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _mask_to_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        # PyTorch's fused paths take True = masked out.
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _attention_mask(mask: torch.Tensor | None, mask_type: int | None, batch: int, q_len: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Bring a fast-path mask to a shape broadcastable to (B, H, Sq, Sk).

    mask_type 0: (Sq, Sk) attention mask; 1: (B, Sk) key padding mask;
    2: generic, already (B, H, Sq, Sk) or broadcastable.
    """
    m = _mask_to_additive(mask, dtype)
    if m is None:
        return None
    if mask_type == 1 or (mask_type is None and m.dim() == 2 and m.shape == (batch, kv_len) and q_len != batch):
        return m.view(batch, 1, 1, kv_len)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m


def _native_mha(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim: int,
    num_head: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    mask_type: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-first (B, S, E) multi-head attention with packed input projection."""
    b, sq, _ = query.shape
    sk = key.shape[1]
    d = embed_dim // num_head
    wq, wk, wv = qkv_weight.chunk(3)
    bq, bk, bv = qkv_bias.chunk(3)
    q = F.linear(query, wq, bq).view(b, sq, num_head, d).transpose(1, 2)
    k = F.linear(key, wk, bk).view(b, sk, num_head, d).transpose(1, 2)
    v = F.linear(value, wv, bv).view(b, sk, num_head, d).transpose(1, 2)
    m = _attention_mask(mask, mask_type, b, sq, sk, q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    o = F.linear(o.transpose(1, 2).reshape(b, sq, embed_dim), proj_weight, proj_bias)
    if need_weights:
        raise NotImplementedError("attention weights requested from the fused path")
    return o, query.new_empty(0)


def _encoder_layer(
    src: torch.Tensor,
    embed_dim: int,
    num_heads: int,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    use_gelu: bool,
    norm_first: bool,
    eps: float,
    norm_weight_1: torch.Tensor,
    norm_bias_1: torch.Tensor,
    norm_weight_2: torch.Tensor,
    norm_bias_2: torch.Tensor,
    ffn_weight_1: torch.Tensor,
    ffn_bias_1: torch.Tensor,
    ffn_weight_2: torch.Tensor,
    ffn_bias_2: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_type: int | None = None,
) -> torch.Tensor:
    """One batch-first encoder layer, as ``_transformer_encoder_layer_fwd`` computes it."""

    def attn(x: torch.Tensor) -> torch.Tensor:
        return _native_mha(
            x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
            mask, False, False, mask_type,
        )[0]

    def ffn(x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, ffn_weight_1, ffn_bias_1)
        h = F.gelu(h) if use_gelu else F.relu(h)
        return F.linear(h, ffn_weight_2, ffn_bias_2)

    def ln1(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (embed_dim,), norm_weight_1, norm_bias_1, eps)

    def ln2(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (embed_dim,), norm_weight_2, norm_bias_2, eps)

    if norm_first:
        x = src + attn(ln1(src))
        return x + ffn(ln2(x))
    x = ln1(src + attn(src))
    return ln2(x + ffn(x))


FUSED_DECOMPOSITIONS: dict[Any, Any] = {
    aten._native_multi_head_attention.default: _native_mha,
    aten._transformer_encoder_layer_fwd.default: _encoder_layer,
}
