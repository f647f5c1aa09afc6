"""Attention over runs of key slots: the unit the chunked PyTorch paths (sparse, condense) compute.

Queries are folded into blocks (n, nb, rows, D) along the batch axis of
4-D SDPA calls (5-D inputs take a slow path). A :class:`Part` is a run of
key slots every query block of a range attends to, with an additive mask
that holds the op's own rule (which slots a row sees) and, read at the
(query, key) pairs used, the user's mask. Several parts of one row are
merged by their log-sum-exps, so no key set is ever concatenated.

A row whose every visible score an additive mask value at or below
:data:`ABSORBING` swallows (``torch.finfo(torch.float32).min`` masks, as
Hugging Face builds them) attends uniformly over its visible keys in
``F.scaled_dot_product_attention`` and in the Triton kernels: in fp32 the
mask absorbs the scores. Its parts' log-sum-exps are then all that value
too (absorbed as well), so merging by them would weigh each part the same;
such rows are merged by each part's number of visible slots instead
(:func:`absorbed`, :func:`visible_slots`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnrw.kernels.common.dense import soft_cap
from attnrw.kernels.common.shapes import acc_dtype, as_4d


#: Additive mask values at or below this absorb any score in fp32 (``finfo.min`` masks); the Triton
#: kernels keep them unscaled for the same reason (:func:`attnrw.kernels.common.triton.log2_units`).
ABSORBING = -1.0e38


@dataclass
class Part:
    """A run of key slots every query block of a range attends to."""

    k: torch.Tensor  # (n, nb, L, D), possibly an overlapping or broadcast view
    v: torch.Tensor  # (n, nb, L, Dv)
    mask: torch.Tensor  # (1 or n, nb, bs or 1, L) additive, in q's dtype: -inf = may not attend
    key_pos: torch.Tensor  # (1 or n, nb, L) int64 position of each slot, seq_len where unused


def user_mask_index(
    attn_mask: torch.Tensor, heads: int, query_pos: torch.Tensor, key_pos: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Indices into the 4-D view of one batch element's mask for every (head, block, row, slot) used.

    attn_mask broadcastable to (1, heads, S, S), query_pos (nb, bs), key_pos
    (1 or heads, nb, L). Returns (indices, 4-D view of the mask); the indices
    broadcast to (1 or heads, nb or 1, bs or 1, L or 1).
    Dimensions where the mask has size 1 are indexed with 0, so the gathered
    values keep them at size 1; nothing S×S is built.
    """
    m4 = as_4d(attn_mask)
    dev = attn_mask.device
    zero = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=dev)
    hi = torch.arange(heads, device=dev).view(-1, 1, 1, 1) if m4.shape[1] > 1 else zero
    # Padding rows and unused slots point past the sequence: read any real entry, the slot mask hides them.
    qi = query_pos.clamp(max=m4.shape[2] - 1)[None, :, :, None] if m4.shape[2] > 1 else zero
    ki = key_pos.clamp(max=m4.shape[3] - 1)[:, :, None, :] if m4.shape[3] > 1 else zero
    return (zero, hi, qi, ki), m4


def add_user_mask(
    bias: torch.Tensor, mask: torch.Tensor | None, heads: int, query_pos: torch.Tensor, key_pos: torch.Tensor
) -> torch.Tensor:
    """A run's additive slot mask combined with the user mask (one batch element's) read at (query, key) positions."""
    if mask is None:
        return bias
    idx, m4 = user_mask_index(mask, heads, query_pos, key_pos)
    user = m4[idx]
    if user.dtype == torch.bool:
        return torch.where(user, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))
    return bias + user.to(bias.dtype)


def scatter_mask_grad(
    dm4: torch.Tensor,
    mask: torch.Tensor,
    where: tuple[slice, slice],
    heads: int,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    ds: torch.Tensor,
) -> None:
    """Add ds (n, nb, rows, L) into the mask gradient at the (query, key) pairs a run read.

    ``mask`` is the part of the user mask the run read, found at ``where``
    (batch, head slices) in ``dm4``, the gradient of the mask's 4-D view.
    """
    idx, _ = user_mask_index(mask, heads, query_pos, key_pos)
    # Sum over the axes the mask broadcasts along, then scatter into its own shape.
    target = torch.broadcast_shapes(*(t.shape for t in idx))
    dims = [d for d in range(4) if target[d] == 1 and ds.shape[d] != 1]
    dsum = ds.sum(dim=dims, keepdim=True) if dims else ds  # sum(dim=[]) would sum all
    dm4[where].index_put_(idx, dsum.to(dm4.dtype), accumulate=True)


def attend_math(q: torch.Tensor, part: Part, scale: float, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out (fp32 for half inputs) -> (out in q's dtype, logsumexp fp32).

    Rows that see nothing give 0 and logsumexp -inf. For what PyTorch's
    fused CPU kernel does not take (value dims other than the key dim, a
    ``softcap`` of the scores before the mask) and for devices without it.
    """
    acc = acc_dtype(q.dtype)
    s = soft_cap((q.to(acc) @ part.k.to(acc).transpose(-1, -2)) * scale, softcap) + part.mask.to(acc)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return (p @ part.v.to(acc)).to(q.dtype), lse.float()


def attend_part(
    q: torch.Tensor, part: Part, scale: float, need_lse: bool, may_be_empty: bool, softcap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q (n, nb, bs, D) over one part -> (out (n, nb, bs, Dv), logsumexp (n, nb, bs) fp32 or None).

    ``may_be_empty``: some row may see no key of the part (a user mask, or a
    part that need not hold the query itself). Such rows output 0 and get
    logsumexp -inf. A ``softcap`` (:func:`~attnrw.kernels.common.dense.soft_cap`)
    takes the written-out path: the fused kernels have no such step.
    """
    if softcap:
        out, lse = attend_math(q, part, scale, softcap)
        return out, lse if need_lse else None
    # One reduction pass, no temporary: a row sees some key iff its largest mask entry is finite.
    visible = part.mask.amax(-1) > float("-inf") if may_be_empty else None
    if not need_lse:
        # One 4-D SDPA call: query blocks are the "heads" axis (5-D inputs take a slow path).
        out = F.scaled_dot_product_attention(q, part.k, part.v, attn_mask=part.mask, scale=scale)
        # Backends differ on rows that see no key (the CPU kernel gives 0, others NaN).
        return (out if visible is None else out.masked_fill_(~visible[..., None], 0.0)), None
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, part.k, part.v, attn_mask=part.mask.expand(*q.shape[:2], -1, -1), scale=scale
        )
        # This kernel reports logsumexp 0 (not -inf) on rows that see nothing.
        lse = lse if visible is None else lse.masked_fill(~visible, float("-inf"))
        return out, lse
    return attend_math(q, part, scale)


def absorbed(lse: torch.Tensor) -> torch.Tensor:
    """Rows whose log-sum-exp an absorbing mask value swallowed (finite, at or below :data:`ABSORBING`)."""
    return (lse <= ABSORBING) & (lse > float("-inf"))


def visible_slots(mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """How many slots of a part's additive mask (·, nb, bs or 1, L) each row sees, fp32, expanded to ``shape``."""
    return (mask > float("-inf")).sum(-1).expand(shape).float()


def merge_partials(
    outs: list[torch.Tensor], lses: list[torch.Tensor], masks: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """Softmax-weighted sum of partial attentions by their logsumexps (fp32); rows seeing nothing give 0.

    ``masks``: the parts' additive masks, given when a float user mask may
    hold absorbing values; rows it absorbed are weighted by their visible
    slots per part (module docstring).
    """
    lse = torch.stack(lses)
    top = lse.amax(0)
    w = torch.exp(lse - top.masked_fill(top == float("-inf"), 0.0))
    if masks is not None:
        hit = absorbed(top)
        if bool(hit.any()):
            counts = torch.stack([visible_slots(m, top.shape) for m in masks])
            w = torch.where(hit, counts, w)
    total = w.sum(0)
    out = sum(o.float() * wi[..., None] for o, wi in zip(outs, w))
    return out / total.masked_fill(total == 0, 1.0)[..., None]
