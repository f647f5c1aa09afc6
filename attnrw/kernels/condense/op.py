"""Registration of ``attnrw::condensed_attention`` and its backward as torch custom ops.

``impl`` picks the implementation: ``"torch"`` the pure-PyTorch path
(:mod:`attnrw.kernels.condense.reference`), ``"triton"`` the Triton kernel
(:mod:`attnrw.kernels.condense.triton`, imported only here and only when
asked for), ``"auto"`` Triton on CUDA tensors when triton imports, PyTorch
otherwise. An explicit ``"triton"`` that cannot run raises
:class:`~attnrw.errors.ImplementationUnavailableError`; it never falls back.

The output is laid out in memory as (batch, S, heads, Dv), as SDPA and
``attnrw::attention`` return it, so the usual ``transpose(1, 2)`` that
follows is contiguous.

The backward is an op of its own (autograd is off inside a custom op's
implementation) and always runs the PyTorch recomputation with explicit
gradient formulas, whichever implementation ran the forward.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable

import torch

from attnrw.config import IMPLS
from attnrw.errors import ImplementationUnavailableError
from attnrw.kernels.attention.op import empty_sdpa_layout, sdpa_layout
from attnrw.kernels.condense.layout import check_inputs
from attnrw.kernels.condense.reference import condensed_attention_grads, condensed_attention_torch


def _load_triton() -> ModuleType:
    """Import the Triton implementation; ImportError (or any import-time failure) propagates."""
    return importlib.import_module("attnrw.kernels.condense.triton")


def _triton_blocker(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device`` here, or None when it can."""
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return (
            f"the Triton condensed-attention kernel needs CUDA tensors (got {device.type}), or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported; use impl='torch' or impl='auto'"
        )
    try:
        _load_triton()
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable", reported with its cause
        return f"triton could not be imported ({type(e).__name__}: {e}); install triton or use impl='torch'"
    return None


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"condensed_attention: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")


def resolve_impl(impl: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The forward function ``impl`` names for tensors on ``device``."""
    _check_impl(impl)
    if impl == "torch":
        return condensed_attention_torch
    if impl == "triton":
        why = _triton_blocker(device)
        if why is not None:
            raise ImplementationUnavailableError(why)
        return _load_triton().condensed_attention_triton
    if device.type == "cuda" and _triton_blocker(device) is None:
        return _load_triton().condensed_attention_triton
    return condensed_attention_torch


@torch.library.custom_op("attnrw::condensed_attention", mutates_args=())
def condensed_attention(
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
    impl: str,
) -> torch.Tensor:
    """Condensed attention; the rule is in :mod:`attnrw.kernels.condense.reference`.

    q (batch, heads, S, D), k (batch, kv_heads, S, D), v (batch, kv_heads, S, Dv) -> (batch, heads, S, Dv).
    """
    fn = resolve_impl(impl, q.device)
    out = fn(q, k, v, attn_mask, is_causal, scale, recent, group, sinks, pooling, size_bias, block_size)
    return sdpa_layout(out)  # free when the implementation already wrote it so


@condensed_attention.register_fake
def _condensed_attention_fake(
    q, k, v, attn_mask, is_causal, scale, recent, group, sinks, pooling, size_bias, block_size, impl
):
    check_inputs(q, k, v, attn_mask, recent, group, sinks, pooling, block_size)
    _check_impl(impl)
    return empty_sdpa_layout(q, v.shape[-1])


@torch.library.custom_op("attnrw::condensed_attention_backward", mutates_args=())
def condensed_attention_backward(
    grad_out: torch.Tensor,
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
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`condensed_attention` for q, k, v and (when ``mask_grad``) the float mask.

    The mask gradient is an empty tensor when not asked for.
    """
    return condensed_attention_grads(
        grad_out, q, k, v, attn_mask, is_causal, scale, recent, group, sinks, pooling, size_bias, block_size, mask_grad
    )


@condensed_attention_backward.register_fake
def _condensed_attention_backward_fake(
    grad_out, q, k, v, attn_mask, is_causal, scale, recent, group, sinks, pooling, size_bias, block_size, mask_grad
):
    dm = torch.empty_like(attn_mask) if (mask_grad and attn_mask is not None) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dm


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, *args, _impl = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.args = tuple(args)


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    mask_grad = bool(attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[3])
    dq, dk, dv, dm = condensed_attention_backward(grad_out, q, k, v, attn_mask, *ctx.args, mask_grad)
    return (dq, dk, dv, (dm if mask_grad else None)) + (None,) * 9


condensed_attention.register_autograd(_backward, setup_context=_setup_context)
