"""The output layout rule every attention op follows.

Outputs are (batch, heads, seq, dim) tensors laid out in memory as
(batch, seq, heads, dim), as ``F.scaled_dot_product_attention`` returns
them, so the ``transpose(1, 2)`` models apply next is contiguous.
"""

from __future__ import annotations

import torch


def sdpa_layout(out: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) values in (B, S, H, D) memory order; free when already so."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def empty_sdpa_layout(q: torch.Tensor, v_dim: int) -> torch.Tensor:
    """An uninitialised output for queries ``q`` (B, H, S, ·): (B, H, S, v_dim) in (B, S, H, v_dim) memory order."""
    b, h, s, _ = q.shape
    return q.new_empty((b, s, h, v_dim)).transpose(1, 2)
