"""Geometry of ``attnrw::condensed_attention`` shared by its PyTorch and Triton paths.

Both paths must agree to the key on what a query sees, so the per-query
rule lives here, as small integer tensors both read: for every query ``i``
the interval of keys it sees exactly, and the groups it sees as summaries.

Notation: ``S`` the sequence length (queries and keys are one aligned
sequence), ``G`` the group size, ``sinks`` the number of sink keys. Group
``g`` holds keys ``[sinks + g·G, min(sinks + (g+1)·G, S))``; there are
``ng = ceil((S - sinks) / G)`` groups (0 when ``S <= sinks``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from attnrw.kernels.common.checks import SELF_ATTENTION, check_aligned, check_at_least, check_choice, check_mask, check_qkv
from attnrw.kernels.common.shapes import cdiv

POOLINGS = ("mean", "query")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    recent: int,
    group: int,
    sinks: int,
    pooling: str,
    block_size: int,
) -> None:
    """Raise ``ValueError`` for inputs the condensed op does not define.

    q (batch, heads, S, head_dim), k (batch, kv_heads, S, head_dim),
    v (batch, kv_heads, S, v_dim), ``heads % kv_heads == 0``, q_len == kv_len;
    ``attn_mask`` bool or float, broadcastable to (batch, heads, S, S).
    """
    op = "condensed_attention"
    check_qkv(op, q, k, v)
    check_aligned(op, q, k, *SELF_ATTENTION)
    check_at_least(op, recent=(recent, 1), group=(group, 1), sinks=(sinks, 0), block_size=(block_size, 1))
    check_choice(op, "pooling", pooling, POOLINGS)
    batch, heads, seq, _ = q.shape
    check_mask(op, attn_mask, (batch, heads, seq, seq))


def num_groups(seq_len: int, sinks: int, group: int) -> int:
    """How many groups the keys after the sinks make."""
    return cdiv(max(seq_len - sinks, 0), group)


@dataclass(frozen=True)
class Geometry:
    """The ints a call's layout depends on (hashable: caches key on it)."""

    seq_len: int
    recent: int
    group: int
    sinks: int
    is_causal: bool

    @property
    def num_groups(self) -> int:
        return num_groups(self.seq_len, self.sinks, self.group)

    @property
    def num_sinks(self) -> int:
        """Sink keys that exist (``sinks`` may exceed the sequence)."""
        return min(self.sinks, self.seq_len)

    @property
    def reach(self) -> tuple[int, int]:
        """How far before and after a query its exact keys may lie (the window plus the widening to groups)."""
        if self.is_causal:
            return self.recent + self.group - 2, 0
        half = self.recent // 2 + self.group - 1
        return half, half


@functools.lru_cache(maxsize=16)
def query_bounds(geo: Geometry, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per query ``i`` (int64 tensors of shape (S,)): ``(xs, xe, glo, ghi)``.

    Query ``i`` sees keys ``xs[i] <= j <= xe[i]`` exactly (empty when
    ``xs > xe``) and the summary of group ``g`` when ``g < glo[i]`` or
    ``g > ghi[i]``; plus the sinks (causal: ``j <= i``). The recent window is
    ``(i - recent, i]`` (causal) or ``|i - j| <= recent // 2``, cut to the
    keys after the sinks; the exact region is the groups it touches, whole
    (causal: still cut at ``i``). Causal queries see summaries only of
    groups entirely before their exact region (``ghi = ng - 1``). A
    bidirectional query whose window lies inside the sinks sees every group
    as a summary. Cached (callers must not modify the result): a model's
    layers share one geometry.
    """
    s, g, sinks, ng = geo.seq_len, geo.group, geo.sinks, geo.num_groups
    i = torch.arange(s, device=device)
    if geo.is_causal:
        lo = (i - geo.recent + 1).clamp(min=sinks)
        glo = (lo - sinks) // g  # i < sinks: lo = sinks, so glo = 0 and xs = sinks > xe = i (empty)
        xs, xe = sinks + glo * g, i
        ghi = torch.full_like(i, ng - 1)
        return xs, xe, glo, ghi
    half = geo.recent // 2
    lo = (i - half).clamp(min=sinks)
    hi = (i + half).clamp(max=s - 1)
    empty = lo > hi  # the window lies inside the sinks
    glo = torch.where(empty, ng, (lo - sinks) // g)
    ghi = torch.where(empty, ng - 1, (hi - sinks).clamp(min=0) // g)
    xs = sinks + glo * g  # empty: >= S > xe
    xe = (sinks + (ghi + 1) * g).clamp(max=s) - 1
    return xs, xe, glo, ghi


def keys_per_query(geo: Geometry) -> float:
    """Mean number of keys and summaries a query sees under the rule (no user mask); for cost reports."""
    xs, xe, glo, ghi = query_bounds(geo, torch.device("cpu"))
    i = torch.arange(geo.seq_len)
    exact = (xe - xs + 1).clamp(min=0)
    summaries = glo + (geo.num_groups - 1 - ghi)
    sinks = (i + 1).clamp(max=geo.num_sinks) if geo.is_causal else torch.full_like(i, geo.num_sinks)
    return float((exact + summaries + sinks).double().mean()) if geo.seq_len else 0.0
