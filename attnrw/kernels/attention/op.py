"""Registration of ``attnrw::attention`` and its backward as torch custom ops.

The backward is an op of its own so that AOTAutograd, Inductor and
``torch.export`` see one opaque call
(:func:`attnrw.kernels.common.autograd.register_backward`).
"""

from __future__ import annotations

import torch

from attnrw.kernels.common.autograd import register_backward
from attnrw.kernels.common.dense import attention_grads, dense_attention
from attnrw.kernels.common.layout import empty_sdpa_layout, sdpa_layout


@torch.library.custom_op("attnrw::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Exact attention. q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> (B, H, Sq, Dv).

    ``softcap`` > 0 caps the scaled scores to ``softcap · tanh(s / softcap)``
    before the mask (:mod:`attnrw.kernels.common.dense`).

    The output is laid out in memory as (B, Sq, H, Dv), as SDPA returns it,
    so the usual ``transpose(1, 2)`` that follows is contiguous.
    """
    return sdpa_layout(dense_attention(q, k, v, attn_mask, is_causal, scale, softcap))


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, is_causal, scale, softcap=0.0):
    return empty_sdpa_layout(q, v.shape[-1])


attention_backward = register_backward(attention, attention_grads)
