"""Registration of ``attnrw::attention`` and its backward as torch custom ops.

The backward is an op of its own so that AOTAutograd, Inductor and
``torch.export`` see one opaque call and the CPU implementation can use
PyTorch's fused SDPA backward.
"""

from __future__ import annotations

import torch

from attnrw.kernels.attention.reference import attention_grads, dense_attention


@torch.library.custom_op("attnrw::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """Exact attention. q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> (B, H, Sq, Dv).

    The output is laid out in memory as (B, Sq, H, Dv), as SDPA returns it,
    so the usual ``transpose(1, 2)`` that follows is contiguous.
    """
    return sdpa_layout(dense_attention(q, k, v, attn_mask, is_causal, scale))


def sdpa_layout(out: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) values in (B, S, H, D) memory order; free when already so."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def empty_sdpa_layout(q: torch.Tensor, v_dim: int) -> torch.Tensor:
    b, h, s, _ = q.shape
    return q.new_empty((b, s, h, v_dim)).transpose(1, 2)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, is_causal, scale):
    return empty_sdpa_layout(q, v.shape[-1])


@torch.library.custom_op("attnrw::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention` for q, k, v and (when ``mask_grad``) the float mask.

    The mask gradient is an empty tensor when not asked for.
    """
    return attention_grads(grad_out, q, k, v, attn_mask, is_causal, scale, mask_grad)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, attn_mask, is_causal, scale, mask_grad):
    dm = torch.empty_like(attn_mask) if (mask_grad and attn_mask is not None) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dm


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.is_causal = is_causal
    ctx.scale = scale


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    mask_grad = bool(
        attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[3]
    )
    dq, dk, dv, dm = attention_backward(grad_out, q, k, v, attn_mask, ctx.is_causal, ctx.scale, mask_grad)
    return dq, dk, dv, (dm if mask_grad else None), None, None


attention.register_autograd(_backward, setup_context=_setup_context)
