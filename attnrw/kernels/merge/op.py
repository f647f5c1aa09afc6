"""Registration of ``attnrw::merged_attention`` and its backward as torch custom ops.

``impl`` picks how the attention on the merged tokens runs: ``"torch"``
PyTorch's SDPA, ``"triton"`` the kernel of :mod:`attnrw.kernels.merge.triton`
(imported only here and only when asked for), ``"auto"`` Triton on CUDA
tensors when triton imports, PyTorch otherwise. The merge step (matching,
averaging, bias) is PyTorch ops either way. An explicit ``"triton"`` that
cannot run raises :class:`~attnrw.errors.ImplementationUnavailableError`;
it never falls back.

The backward is an op of its own, registered as the autograd formula by
:func:`attnrw.kernels.common.autograd.register_backward`; it always runs the
PyTorch recomputation with explicit math, whichever implementation ran the
forward.
"""

from __future__ import annotations

import torch

from attnrw.kernels.common.autograd import register_backward
from attnrw.kernels.common.layout import empty_sdpa_layout
from attnrw.kernels.dispatch import check_impl, choose
from attnrw.kernels.merge.plan import check_inputs
from attnrw.kernels.merge.reference import Attend, attend_torch, merged_attention_grads, merged_attention_torch


def resolve_attend(impl: str, device: torch.device) -> Attend:
    """The attention function ``impl`` names for tensors on ``device`` (rule in :mod:`attnrw.kernels.dispatch`)."""
    return choose(impl, device, op="merged_attention", torch_fn=attend_torch,
                  module="attnrw.kernels.merge.triton", attr="biased_attention_triton", kernel="merged-attention")


# Schemas written out: inferred ones would make r and protect SymInts, but they are policy
# constants, and the rewriter emits exactly this signature.
@torch.library.custom_op(
    "attnrw::merged_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal, float scale, float ratio, int r, "
    "str mode, int[] protect, str impl) -> Tensor",
)
def merged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    ratio: float,
    r: int,
    mode: str,
    protect: list[int],
    impl: str,
) -> torch.Tensor:
    """Attention over merged tokens; the rule is in :mod:`attnrw.kernels.merge.reference`.

    q (batch, heads, q_len, D), k (batch, kv_heads, kv_len, D), v (batch,
    kv_heads, kv_len, Dv) -> (batch, heads, q_len, Dv), laid out in memory as
    (batch, q_len, heads, Dv) like ``attnrw::attention``. ``r >= 0`` merges
    away r tokens, ``r == -1`` ``round(ratio · kv_len)``; ``mode`` is
    ``"kv"`` or ``"qkv"``; ``protect`` lists positions that never merge;
    ``is_causal=True`` raises ``ValueError``.
    """
    check_inputs(q, k, v, attn_mask, is_causal, ratio, r, mode, protect)
    attend = resolve_attend(impl, q.device)
    return merged_attention_torch(q, k, v, attn_mask, is_causal, scale, ratio, r, mode, protect, attend)


@merged_attention.register_fake
def _merged_attention_fake(q, k, v, attn_mask, is_causal, scale, ratio, r, mode, protect, impl):
    check_inputs(q, k, v, attn_mask, is_causal, ratio, r, mode, protect)
    check_impl(impl, "merged_attention")
    return empty_sdpa_layout(q, v.shape[-1])


merged_attention_backward = register_backward(merged_attention, merged_attention_grads)
