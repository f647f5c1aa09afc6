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

The backward is an op of its own, registered as the autograd formula by
:func:`attnrw.kernels.common.autograd.register_backward`; it always runs the
PyTorch recomputation with explicit gradient formulas
(:mod:`attnrw.kernels.condense.grads`), whichever implementation ran the
forward.
"""

from __future__ import annotations

from typing import Callable

import torch

from attnrw.kernels.common.autograd import register_backward
from attnrw.kernels.common.layout import empty_sdpa_layout, sdpa_layout
from attnrw.kernels.condense.grads import condensed_attention_grads
from attnrw.kernels.condense.layout import check_inputs
from attnrw.kernels.condense.reference import condensed_attention_torch
from attnrw.kernels.dispatch import check_impl, choose


def resolve_impl(impl: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The forward function ``impl`` names for tensors on ``device`` (rule in :mod:`attnrw.kernels.dispatch`)."""
    return choose(impl, device, op="condensed_attention", torch_fn=condensed_attention_torch,
                  module="attnrw.kernels.condense.triton", attr="condensed_attention_triton",
                  kernel="condensed-attention")


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
    check_impl(impl, "condensed_attention")
    return empty_sdpa_layout(q, v.shape[-1])


condensed_attention_backward = register_backward(condensed_attention, condensed_attention_grads)
