"""The input checks of the attention ops, worded with each op's own name and argument names.

Every op takes ``q`` (batch, heads, q_len, head_dim), ``k`` (batch,
kv_heads, kv_len, head_dim), ``v`` (batch, kv_heads, kv_len, v_dim) with
``heads`` a multiple of ``kv_heads``, and an optional ``attn_mask``, bool
(True = may attend) or additive float, broadcastable to (batch, heads,
q_len, kv_len) as in ``F.scaled_dot_product_attention``. Each raises
``ValueError`` with a message that names the op and says what to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """4-D q, k, v that fit one another (batch, kv heads, kv_len, head_dim) and ``heads % kv_heads == 0``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op} expects 4-D q, k, v (batch, heads, seq, dim); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: q and k head_dim differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{op}: heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")


#: What the ops over one aligned sequence (sparse, condensed) say when q_len != kv_len: why, and what to use instead.
SELF_ATTENTION = (
    "runs over one aligned sequence (self-attention)",
    "Use dense attention for cross-attention or KV-cache decoding.",
)


def check_aligned(op: str, q: torch.Tensor, k: torch.Tensor, why: str, instead: str) -> None:
    """q_len == kv_len, for ops over one aligned sequence; ``why`` says what needs it, ``instead`` what to use."""
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"{op} {why}, so it needs q_len == kv_len; got q_len={q.shape[-2]}, kv_len={k.shape[-2]}. {instead}"
        )


def check_mask(op: str, attn_mask: torch.Tensor | None, shape: Sequence[int], names: str = "(batch, heads, q_len, kv_len)") -> None:
    """``attn_mask`` None, or bool / float broadcastable to ``shape`` (described as ``names``)."""
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"{op}: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    want = tuple(shape)
    if attn_mask.dim() > 4 or any(m not in (1, w) for m, w in zip(attn_mask.shape, want[4 - attn_mask.dim() :])):
        raise ValueError(
            f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {names} = {want}"
        )


def check_at_least(op: str, **bounds: tuple[int, int]) -> None:
    """Each argument ``name=(value, lowest)`` is at least its lowest allowed value."""
    for name, (value, lo) in bounds.items():
        if value < lo:
            raise ValueError(f"{op}: {name} must be >= {lo}, got {value}")


def check_choice(op: str, name: str, value: str, choices: Sequence[str]) -> None:
    """A string argument is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
