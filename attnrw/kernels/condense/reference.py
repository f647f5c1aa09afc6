"""Condensed attention (sinks + exact recent keys + one summary per older group) in pure PyTorch.

This is the CPU path of ``attnrw::condensed_attention`` and the oracle its
Triton kernel is tested against. Shapes: ``q`` (batch, heads, S, head_dim),
``k`` (batch, kv_heads, S, head_dim), ``v`` (batch, kv_heads, S, v_dim);
``heads`` a multiple of ``kv_heads`` (query head ``h`` uses kv head
``h // (heads // kv_heads)``). Queries and keys are one aligned sequence.

What query ``i`` sees (the geometry is :func:`attnrw.kernels.condense.layout.query_bounds`):

* the ``sinks`` first keys (causal: ``j <= i``);
* exactly, every key of the groups its recent window touches: keys after
  the sinks are cut into groups of ``group`` starting at ``sinks``; the
  window is ``(i - recent, i]`` (causal; the exact region is still cut at
  ``i``) or ``|i - j| <= recent // 2``;
* one summary key and value for every other group it may see (causal: only
  groups entirely before its exact region; bidirectional: all others).

So every key counts once, in person or through its group's summary; a
window covering the sequence, or ``group == 1``, gives dense attention.

Summaries (LCA / SnapKV-style pooling). For group ``g`` the key and value
are ``Σ_j w_j k_j`` and ``Σ_j w_j v_j`` over its member keys ``j``, with
``w = softmax_j(z_j)``: ``z_j = a_j`` for ``pooling="mean"``, and
``z_j = a_j + scale · probe · k_j`` for ``pooling="query"``, where the probe
is the mean of the queries of the query's block of ``block_size`` (per
head). The summary's score is ``q · k_g · scale + b_g`` with
``b_g = max_j a_j`` (``size_bias=False``) or ``logsumexp_j a_j``
(``size_bias=True``: ``log(size)`` when the ``a_j`` are 0, so the summary
weighs as the keys it stands for; size = the group's length, less only for
a last partial group).

The user mask (``attn_mask``, as in ``F.scaled_dot_product_attention``:
bool True = may attend, float added to the scores) applies:

* to sinks and exact keys at each (query, key) pair, as usual;
* to summaries through ``a_j``: the mask's rows of the queries of one
  query block are reduced to one row by their elementwise max (bool: or),
  and ``a_j`` is that row's value at key ``j`` (bool: 0 or -inf). Keys with
  ``a_j = -inf`` (e.g. padding) are not members: they leave the group's
  pooling and its size; a group without members is not seen. A large
  finite negative value (``finfo.min`` masks) weighs a key by ~0 instead,
  which gives the same summary, size bias included. Reducing over the
  block keeps the cost per query block instead of per query; masks that do
  not vary along the queries (padding) are exact under it, and a causal
  padding mask is too, since causal summaries lie before all of the
  block's queries. Without a mask ``a_j = 0``;
* and to whether a query sees a summary at all: only when its own mask row
  allows some key of the group (so a query whose row allows nothing sees
  nothing).

A query that sees nothing (only possible through the mask) outputs 0.

How it is computed (cost O(S·(recent + S/group)), no S×S tensor): two parts
per query, merged by their log-sum-exp.

* The *window*: queries are cut into blocks of ``WINDOW_FOLD`` folded into
  the batch axis of 4-D SDPA calls; block ``w`` reads keys
  ``[w·fold - before, w·fold - before + L)`` as an overlapping strided view
  of one zero-padded copy of K and V (no gather), with a cached additive
  mask giving each query's exact interval.
* The *condensed* part: the sink keys followed by the summaries. Summaries
  are computed once per (batch, head, group) when nothing depends on the
  query block (mean pooling, mask constant along the queries) and all
  queries attend to them in one SDPA call per range of rows; otherwise per
  query block, range by range as they are needed (only the groups the range
  sees), with the blocks folded into the batch axis. A cached mask gives
  which summaries each query sees; causal ranges only read the summaries
  they can see.

The blocking and its cached masks are :mod:`~attnrw.kernels.condense.blocking`,
the pooling :mod:`~attnrw.kernels.condense.summaries`, the two parts
:mod:`~attnrw.kernels.condense.parts`. The backward (an op of its own,
:mod:`~attnrw.kernels.condense.grads`) recomputes both parts and applies
the gradient formulas by hand, through the pooling too (to keys, values,
the probe's queries and a float mask).
"""

from __future__ import annotations

import torch

from attnrw.kernels.common.layout import empty_sdpa_layout
from attnrw.kernels.condense.blocking import has_condensed_part, make_layout
from attnrw.kernels.condense.layout import check_inputs
from attnrw.kernels.condense.parts import chunks, condensed_part, merge_into, window_part
from attnrw.kernels.condense.summaries import sources


def condensed_attention_torch(
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
) -> torch.Tensor:
    """Condensed attention; see the module docstring for the rule.

    q (batch, heads, S, D), k (batch, kv_heads, S, D), v (batch, kv_heads, S, Dv),
    attn_mask None or broadcastable to (batch, heads, S, S) -> (batch, heads, S, Dv)
    in q's dtype, laid out in memory as (batch, S, heads, Dv) like SDPA's output.
    Raises ``ValueError`` when q_len != kv_len.
    """
    check_inputs(q, k, v, attn_mask, recent, group, sinks, pooling, block_size)
    batch, heads, seq, _ = q.shape
    out = empty_sdpa_layout(q, v.shape[-1])
    if seq == 0 or batch * heads == 0:
        return out
    lay = make_layout(q, recent, group, sinks, is_causal, block_size)
    two = has_condensed_part(lay)
    for c in chunks(q, k, v, attn_mask, lay):
        ow, lw, cw = window_part(c, lay, scale, need_lse=two)
        if not two:
            out[c.batch, c.heads] = ow[:, :seq]
            continue
        src = sources(c.q, c.k, c.v, c.values, pooling, block_size)
        oc, lc, cc = condensed_part(c, lay, src, scale, size_bias)
        cw, cc = (None if x is None else x[:, :seq] for x in (cw, cc))
        out[c.batch, c.heads] = merge_into(ow[:, :seq], lw[:, :seq], oc[:, :seq], lc[:, :seq], cw, cc)[0]
    return out
