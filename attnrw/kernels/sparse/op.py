"""Registration of ``attnrw::sparse_attention`` and its backward as torch custom ops.

``impl`` picks the implementation: ``"torch"`` the pure-PyTorch path
(:mod:`attnrw.kernels.sparse.reference`), ``"triton"`` the Triton kernel
(:mod:`attnrw.kernels.sparse.triton`, imported only here and only when
asked for), ``"auto"`` Triton on CUDA tensors when triton imports, PyTorch
otherwise. An explicit ``"triton"`` that cannot run raises
:class:`~attnrw.errors.ImplementationUnavailableError`; it never falls back.

The backward is an op of its own, registered as the autograd formula by
:func:`attnrw.kernels.common.autograd.register_backward`; it always runs the
PyTorch recomputation, whichever implementation ran the forward.
"""

from __future__ import annotations

from typing import Callable

import torch

from attnrw.kernels.common.autograd import register_backward
from attnrw.kernels.dispatch import check_impl, choose
from attnrw.kernels.sparse.layout import check_inputs
from attnrw.kernels.sparse.reference import sparse_attention_grads, sparse_attention_torch


def resolve_impl(impl: str, device: torch.device, softcap: float = 0.0) -> Callable[..., torch.Tensor]:
    """The forward function ``impl`` names for tensors on ``device`` (rule in :mod:`attnrw.kernels.dispatch`).

    A softcap is the PyTorch path's alone (the Triton kernel has no cap).
    """
    return choose(impl, device, op="sparse_attention", torch_fn=sparse_attention_torch,
                  module="attnrw.kernels.sparse.triton", attr="sparse_attention_triton", kernel="sparse-attention",
                  lacks="softcap the scores" if softcap else None)


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
    softcap: float = 0.0,
) -> torch.Tensor:
    """Sinks + sliding window (+ block top-k) attention; the rule is in :mod:`attnrw.kernels.sparse.reference`.

    q (batch, heads, S, D), k (batch, kv_heads, S, D), v (batch, kv_heads, S, Dv) -> (batch, heads, S, Dv).
    ``softcap`` > 0 caps the scores before the window (PyTorch path only: the Triton kernel has no cap).
    """
    fn = resolve_impl(impl, q.device, softcap)
    capped = {"softcap": softcap} if softcap else {}  # only the PyTorch path takes it
    return fn(q, k, v, attn_mask, is_causal, scale, window, sinks, topk, block_size, **capped).contiguous()


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, attn_mask, is_causal, scale, window, sinks, topk, block_size, impl, softcap=0.0):
    check_inputs(q, k, v, attn_mask, window, sinks, topk, block_size)
    check_impl(impl, "sparse_attention")
    if softcap:
        resolve_impl(impl, q.device, softcap)  # refuses impl="triton" with a cap, as the real call does
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


sparse_attention_backward = register_backward(sparse_attention, sparse_attention_grads)
