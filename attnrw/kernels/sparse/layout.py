"""Geometry of ``attnrw::sparse_attention`` shared by its PyTorch and Triton paths.

Both paths must agree to the key on which keys a query sees, so the rules that
are not a per-element formula live here: the input checks, which key blocks a
query block's band touches, which blocks are candidates for top-k, and the
run-time top-k choice itself.

Notation: ``S`` is the sequence length (queries and keys are one aligned
sequence), ``bs`` the block size, ``nb = ceil(S / bs)`` the number of blocks;
query block ``qb`` holds queries ``[qb·bs, min((qb+1)·bs, S))`` and key block
``kb`` keys ``[kb·bs, min((kb+1)·bs, S))``.
"""

from __future__ import annotations

import torch

from attnrw.kernels.common.checks import SELF_ATTENTION, check_aligned, check_at_least, check_mask, check_qkv
from attnrw.kernels.common.shapes import block_means, cdiv

__all__ = ["band_bounds", "band_reach", "candidate_blocks", "cdiv", "check_inputs", "select_blocks"]

def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    window: int,
    sinks: int,
    topk: int,
    block_size: int,
) -> None:
    """Raise ``ValueError`` for inputs the sparse op does not define.

    q (batch, heads, S, head_dim), k (batch, kv_heads, S, head_dim),
    v (batch, kv_heads, S, v_dim), ``heads % kv_heads == 0``; ``attn_mask``
    bool or float, broadcastable to (batch, heads, S, S).
    """
    op = "sparse_attention"
    check_qkv(op, q, k, v)
    check_aligned(op, q, k, *SELF_ATTENTION)
    check_at_least(op, window=(window, 1), sinks=(sinks, 0), topk=(topk, 0), block_size=(block_size, 1))
    batch, heads, seq, _ = q.shape
    check_mask(op, attn_mask, (batch, heads, seq, seq))


def band_reach(seq_len: int, block_size: int, window: int, is_causal: bool) -> tuple[int, int]:
    """How many key blocks before and after its own the band of a query block touches.

    Causal: query ``i`` sees ``i - window < j <= i``, so the block's band starts
    ``window - 1`` keys before its first query. Bidirectional: ``|i - j| <=
    window // 2`` on both sides. Capped at ``nb - 1``: farther blocks do not exist.
    """
    nb = cdiv(seq_len, block_size)
    if is_causal:
        before, after = cdiv(window - 1, block_size), 0
    else:
        before = after = cdiv(window // 2, block_size)
    return min(before, nb - 1), min(after, nb - 1)


def band_bounds(seq_len: int, block_size: int, window: int, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last key (inclusive, clipped to the sequence) any query of each block sees through the band.

    Returns two int64 tensors of shape (nb,), on the CPU.
    """
    starts = torch.arange(0, seq_len, block_size)
    stops = (starts + block_size).clamp(max=seq_len)
    if is_causal:
        lo, hi = starts - window + 1, stops - 1
    else:
        lo, hi = starts - window // 2, stops - 1 + window // 2
    return lo.clamp(min=0), hi.clamp(max=seq_len - 1)


def candidate_blocks(seq_len: int, block_size: int, window: int, sinks: int, is_causal: bool) -> torch.Tensor:
    """(nb, nb) bool: key block ``kb`` may be a top-k choice of query block ``qb``.

    A block is excluded when it intersects the band of the query block (the
    keys any of its queries sees through the window) or the sink region
    ``[0, sinks)``, even if only partly: the band and sinks already pay for
    those keys, so a choice there would add little and would make one key
    reachable two ways. Causal: only blocks at or before the query block (in
    practice before it, since a block's own keys are always in its band).
    """
    lo, hi = band_bounds(seq_len, block_size, window, is_causal)
    kstart = torch.arange(0, seq_len, block_size)
    kstop = (kstart + block_size).clamp(max=seq_len) - 1
    in_band = (kstart[None, :] <= hi[:, None]) & (kstop[None, :] >= lo[:, None])
    in_sinks = kstart < min(sinks, seq_len)
    cand = ~in_band & ~in_sinks[None, :]
    if is_causal:
        cand &= torch.ones_like(cand).tril()
    return cand


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    topk: int,
    block_size: int,
    window: int,
    sinks: int,
    is_causal: bool,
) -> torch.Tensor | None:
    """The top-k key blocks of every query block, or ``None`` when no block can be chosen.

    Pooled score of (query block, key block) = mean of the block's queries ·
    mean of the block's keys (fp32, per batch and query head; a GQA query
    head uses its kv head's keys). Among :func:`candidate_blocks`, the
    ``min(topk, most candidates any block has)`` best are kept.

    q (batch, heads, S, D), k (batch, kv_heads, S, D) -> int64
    (batch, heads, nb, kk) key-block indices, ``-1`` where a query block has
    fewer candidates than ``kk``. The user mask plays no part in the choice.
    Cost O((S / bs)² · D): small beside the attention itself.
    """
    if topk == 0:
        return None
    seq_len = q.shape[-2]
    cand = candidate_blocks(seq_len, block_size, window, sinks, is_causal)
    kk = min(topk, int(cand.sum(1).max()))
    if kk == 0:
        return None
    batch, heads = q.shape[:2]
    kv_heads = k.shape[1]
    qm = block_means(q, block_size).unflatten(1, (kv_heads, heads // kv_heads))
    km = block_means(k, block_size)[:, :, None]
    scores = (qm @ km.transpose(-1, -2)).flatten(1, 2)
    scores = scores.masked_fill(~cand.to(scores.device), float("-inf"))
    val, idx = scores.topk(kk, dim=-1)
    return idx.masked_fill(val == float("-inf"), -1)
