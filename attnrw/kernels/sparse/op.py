"""Registration of ``attnrw::sparse_attention`` and its backward as torch custom ops.

``impl`` picks the implementation: ``"torch"`` the pure-PyTorch path
(:mod:`attnrw.kernels.sparse.reference`), ``"triton"`` the Triton kernel
(:mod:`attnrw.kernels.sparse.triton`, imported only here and only when
asked for), ``"auto"`` Triton on CUDA tensors when triton imports, PyTorch
otherwise. An explicit ``"triton"`` that cannot run raises
:class:`~attnrw.errors.ImplementationUnavailableError`; it never falls back.

The backward is an op of its own (autograd is off inside a custom op's
implementation) and always runs the PyTorch recomputation, whichever
implementation ran the forward.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable

import torch

from attnrw.errors import ImplementationUnavailableError
from attnrw.kernels.sparse.layout import check_inputs
from attnrw.kernels.sparse.reference import sparse_attention_grads, sparse_attention_torch

from attnrw.config import IMPLS  # noqa: E402  (one list of impl names for policies and ops)


def _load_triton() -> ModuleType:
    """Import the Triton implementation; ImportError (or any import-time failure) propagates."""
    return importlib.import_module("attnrw.kernels.sparse.triton")


def _triton_blocker(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device`` here, or None when it can."""
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return (
            f"the Triton sparse-attention kernel needs CUDA tensors (got {device.type}), or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported; use impl='torch' or impl='auto'"
        )
    try:
        _load_triton()
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable", reported with its cause
        return f"triton could not be imported ({type(e).__name__}: {e}); install triton or use impl='torch'"
    return None


def resolve_impl(impl: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The forward function ``impl`` names for tensors on ``device``."""
    if impl == "torch":
        return sparse_attention_torch
    if impl == "triton":
        why = _triton_blocker(device)
        if why is not None:
            raise ImplementationUnavailableError(why)
        return _load_triton().sparse_attention_triton
    if impl == "auto":
        if device.type == "cuda" and _triton_blocker(device) is None:
            return _load_triton().sparse_attention_triton
        return sparse_attention_torch
    raise ValueError(f"sparse_attention: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")


@torch.library.custom_op("attnrw::sparse_attention", mutates_args=())
def sparse_attention(
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
    impl: str,
) -> torch.Tensor:
    """Sinks + sliding window (+ block top-k) attention; the rule is in :mod:`attnrw.kernels.sparse.reference`.

    q (batch, heads, S, D), k (batch, kv_heads, S, D), v (batch, kv_heads, S, Dv) -> (batch, heads, S, Dv).
    """
    fn = resolve_impl(impl, q.device)
    return fn(q, k, v, attn_mask, is_causal, scale, window, sinks, topk, block_size).contiguous()


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, attn_mask, is_causal, scale, window, sinks, topk, block_size, impl):
    check_inputs(q, k, v, attn_mask, window, sinks, topk, block_size)
    if impl not in IMPLS:
        raise ValueError(f"sparse_attention: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("attnrw::sparse_attention_backward", mutates_args=())
def sparse_attention_backward(
    grad_out: torch.Tensor,
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
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`sparse_attention` for q, k, v and (when ``mask_grad``) the float mask.

    The mask gradient is an empty tensor when not asked for.
    """
    return sparse_attention_grads(
        grad_out, q, k, v, attn_mask, is_causal, scale, window, sinks, topk, block_size, mask_grad
    )


@sparse_attention_backward.register_fake
def _sparse_attention_backward_fake(
    grad_out, q, k, v, attn_mask, is_causal, scale, window, sinks, topk, block_size, mask_grad
):
    dm = torch.empty_like(attn_mask) if (mask_grad and attn_mask is not None) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dm


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, window, sinks, topk, block_size, _impl = inputs
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.args = (is_causal, scale, window, sinks, topk, block_size)


def _backward(ctx, grad_out):
    q, k, v, attn_mask = ctx.saved_tensors
    mask_grad = bool(attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[3])
    dq, dk, dv, dm = sparse_attention_backward(grad_out, q, k, v, attn_mask, *ctx.args, mask_grad)
    return dq, dk, dv, (dm if mask_grad else None), None, None, None, None, None, None, None


sparse_attention.register_autograd(_backward, setup_context=_setup_context)
