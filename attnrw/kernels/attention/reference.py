"""Dense attention in pure PyTorch: the CPU path of ``attnrw::attention`` and its oracle.

The fused path and its backward are :mod:`attnrw.kernels.common.dense`
(other ops fall back to them too); :func:`math_attention` is the textbook
formula the tests compare against. Shapes and mask rules are those of
:mod:`attnrw.kernels.common.checks`; ``is_causal`` means what it means in
``F.scaled_dot_product_attention``: query i sees keys j <= i (aligned
top-left when q_len != kv_len); the rewriter only sets it for such masks.
"""

from __future__ import annotations

import torch

from attnrw.kernels.common.dense import attention_grads, dense_attention
from attnrw.kernels.common.shapes import expand_kv

__all__ = ["attention_grads", "dense_attention", "math_attention"]


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The textbook formula with an S×S matrix; only for tests and tiny shapes."""
    heads = q.shape[1]
    k = expand_kv(k, heads).to(torch.float64)
    v = expand_kv(v, heads).to(torch.float64)
    s = q.to(torch.float64) @ k.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if is_causal:
        q_len, kv_len = s.shape[-2:]
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).to(q.dtype)
