"""Merged-token attention in pure PyTorch: the CPU path of ``attnrw::merged_attention`` and its oracle.

Shapes: ``q`` (batch, heads, q_len, head_dim), ``k`` (batch, kv_heads,
kv_len, head_dim), ``v`` (batch, kv_heads, kv_len, v_dim), ``heads`` a
multiple of ``kv_heads``; ``attn_mask`` broadcastable to (batch, heads,
q_len, kv_len), bool (True = may attend) or additive float, as in
``F.scaled_dot_product_attention``. Output (batch, heads, q_len, v_dim),
laid out in memory as (batch, q_len, heads, v_dim) like SDPA's.

Which tokens merge is :func:`attnrw.kernels.merge.plan.merge_plan` (bipartite
soft matching on the keys). Then:

* ``"kv"`` (SAT-style): keys and values of each merged token are the mean of
  its members' (per kv head); queries stay as they are. Attention runs on
  the ``M`` merged keys, each carrying an additive bias (proportional
  attention, below), so a merged token of identical keys gets exactly the
  attention mass its members had.
* ``"qkv"`` (MaMe/MaRe-style, q_len == kv_len): queries are merged by the
  same plan (mean of members), attention runs among the ``M`` merged tokens,
  and each original position receives its merged token's output.

**Bias of a merged key** ``m`` for query ``i``: ``log Σ_{j ∈ m} exp(mask[i, j])``
with the mask made additive (bool: 0 / -inf; no mask: 0). Without a mask
this is ``log(size)``; a key forbidden for all members is forbidden
(``-inf``); one allowed for some members counts only those. In ``"qkv"``
mode a merged query's bias row is the mean of its members' rows (its score
``q·k`` is the mean of theirs too), so it may attend to a key only where
every member may. A query that sees no key outputs 0.

Merging nothing (``r == 0``, ``ratio`` rounding to 0, or nothing eligible)
is dense attention, through the same call as ``attnrw::attention``.

The merge runs as dense batched ops (``index_add_``/``index_select`` over
token rows, ``scatter_reduce`` for the mask), no loop over tokens. The
backward (:func:`merged_attention_grads`) treats the plan as a constant and
differentiates the averaging, the bias and the attention by explicit math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from attnrw.kernels.common.dense import attention_grads, dense_attention
from attnrw.kernels.common.layout import sdpa_layout
from attnrw.kernels.common.shapes import acc_dtype, additive, as_4d, reduce_to_shape
from attnrw.kernels.merge.plan import MergePlan, check_inputs, merge_plan

#: Attention on (possibly merged) tensors: (q, k, v, mask or bias, scale) -> (batch, heads, q_len, v_dim).
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


def attend_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention with an additive bias (or bool mask) through SDPA; what ``attnrw::attention`` runs."""
    return dense_attention(q, k, v, bias, False, scale)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B·N, h·d): one row per token (a view when x is laid out as (B, N, h, d))."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n, h * d)


def _from_rows(rows: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(B·T, h·d) -> (B, h, T, d), a view laid out as (B, T, h, d)."""
    return rows.view(batch, -1, heads, rows.shape[-1] // heads).transpose(1, 2)


def mean_rows(
    rows: torch.Tensor, plan: MergePlan, flat: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(B·N, F) token rows -> (B·M, F): each merged token's mean of its members, in the accumulation dtype.

    ``flat`` is ``plan.flat_index()``. With ``weights`` (B, N) (tokens that
    already stand for several) the mean is weighted, and ``plan.sizes`` must
    be the sums of the weights.
    """
    rows = rows.to(acc_dtype(rows.dtype))
    if weights is not None:
        rows = rows * weights.flatten()[:, None].to(rows.dtype)
    sums = rows.new_zeros(plan.sizes.numel(), rows.shape[-1]).index_add_(0, flat, rows)
    return sums.div_(plan.sizes.flatten()[:, None].to(sums.dtype))


def merge_tokens(
    x: torch.Tensor, plan: MergePlan, flat: torch.Tensor | None = None, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, h, N, d) -> (B, h, M, d): :func:`mean_rows` over each token's heads (fp32 accumulation for half)."""
    batch, heads = x.shape[:2]
    flat = plan.flat_index() if flat is None else flat
    return _from_rows(mean_rows(_token_rows(x), plan, flat, weights).to(x.dtype), batch, heads)


def unmerge_grad(g: torch.Tensor, plan: MergePlan, flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Backward of :func:`merge_tokens`: (B, h, M, d) -> (B, h, N, d), each member gets grad / size."""
    batch, heads = g.shape[:2]
    rows = _token_rows(g).to(acc_dtype(dtype)) / plan.sizes.flatten()[:, None]
    return _from_rows(rows.index_select(0, flat).to(dtype), batch, heads)


def restore(out: torch.Tensor, plan: MergePlan, flat: torch.Tensor) -> torch.Tensor:
    """(B, h, M, d) -> (B, h, N, d): each token takes its merged token's row; laid out as (B, N, h, d)."""
    batch, heads = out.shape[:2]
    return _from_rows(_token_rows(out).index_select(0, flat), batch, heads)


def _restore_grad(g: torch.Tensor, plan: MergePlan, flat: torch.Tensor) -> torch.Tensor:
    """Backward of :func:`restore`: sum the gradients of each merged token's members."""
    batch, heads = g.shape[:2]
    rows = _token_rows(g)
    sums = rows.new_zeros(batch * plan.num_tokens, rows.shape[-1]).index_add_(0, flat, rows)
    return _from_rows(sums, batch, heads)


def additive_mask(attn_mask: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The mask as a 4-D additive tensor (bool: 0 / -inf) in ``acc``."""
    m4 = as_4d(attn_mask)
    return additive(m4, acc) if m4.dtype == torch.bool else m4.to(acc)


def key_logsumexp(madd: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """log Σ exp over each merged key's members: (B, h', q', N) -> (B, h', q', M), and the index used."""
    idx = plan.index[:, None, None, :].expand(madd.shape)
    shape = (*madd.shape[:-1], plan.num_tokens)
    top = madd.new_full(shape, float("-inf")).scatter_reduce_(-1, idx, madd, "amax")
    # A merged key all of whose members are -inf stays -inf (shift by 0, not by -inf: no NaN).
    top = top.masked_fill(top == float("-inf"), 0.0)
    sums = madd.new_zeros(shape).scatter_add_(-1, idx, torch.exp(madd - top.gather(-1, idx)))
    return top + sums.log(), idx


@dataclass
class _Merged:
    """The merged inputs of the attention, and what the backward of the bias needs."""

    q: torch.Tensor  # (B, H, M, D) in "qkv" mode, else the original q
    k: torch.Tensor  # (B, Hkv, M, D)
    v: torch.Tensor  # (B, Hkv, M, Dv)
    bias: torch.Tensor  # (B, 1, 1, M) without a mask, else (B, h', q'', M): see _merge
    flat: torch.Tensor  # plan.flat_index()
    madd: torch.Tensor | None  # the additive mask, (B, h', q', N)
    key_lse: torch.Tensor | None  # its log-sum-exp over each merged key's members, (B, h', q', M)
    key_idx: torch.Tensor | None  # the index that log-sum-exp scattered with, madd's shape


def _merge(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    plan: MergePlan,
    merge_queries: bool,
) -> _Merged:
    """Merge k, v (and q in "qkv" mode) by the plan, and build the bias of the merged keys.

    The bias (module docstring) has the mask's head dim h' and query dim q''
    (merged to M in "qkv" mode when the mask varies along queries), so its
    cost is that of the mask, not of B·H·S²; it is fp32 (fp64 for fp64 inputs).
    """
    acc = acc_dtype(q.dtype)
    flat = plan.flat_index()
    km, vm = merge_tokens(k, plan, flat), merge_tokens(v, plan, flat)
    qm = merge_tokens(q, plan, flat) if merge_queries else q
    if attn_mask is None:
        bias = plan.sizes.to(acc).log()[:, None, None, :]
        return _Merged(qm, km, vm, bias, flat, None, None, None)
    batch, n = plan.index.shape
    madd = additive_mask(attn_mask, acc)
    madd = madd.expand(batch, madd.shape[1], madd.shape[2], n)
    key_lse, key_idx = key_logsumexp(madd, plan)
    bias = merge_rows(key_lse, plan) if merge_queries and key_lse.shape[2] > 1 else key_lse
    return _Merged(qm, km, vm, bias, flat, madd, key_lse, key_idx)


def merge_rows(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Mean over the members of each merged query: (B, h', N, M) -> (B, h', M, M)."""
    idx = plan.index[:, None, :, None].expand(x.shape)
    sums = x.new_zeros(x.shape[0], x.shape[1], plan.num_tokens, x.shape[3]).scatter_add_(2, idx, x)
    return sums / plan.sizes[:, None, :, None].to(x.dtype)


def zero_unseen(out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Rows whose bias is -inf for every key output 0 (SDPA on the CPU does that already, CUDA gives NaN)."""
    seen = bias.amax(-1, keepdim=True) > float("-inf")
    return out.masked_fill_(~seen, 0.0)


def merged_attention_torch(
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
    attend: Attend = attend_torch,
) -> torch.Tensor:
    """Merged-token attention (module docstring) -> (batch, heads, q_len, v_dim) in q's dtype.

    ``attend`` runs the attention part (PyTorch's SDPA here, the Triton
    kernel when :mod:`attnrw.kernels.merge.op` picks it).
    """
    check_inputs(q, k, v, attn_mask, is_causal, ratio, r, mode, protect)
    plan = merge_plan(k, attn_mask, ratio, r, protect)
    if plan.num_merged == 0:
        return sdpa_layout(attend(q, k, v, attn_mask, scale))
    return attention_with_plan(q, k, v, attn_mask, scale, plan, mode, attend)


def attention_with_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
    plan: MergePlan,
    mode: str,
    attend: Attend = attend_torch,
) -> torch.Tensor:
    """The merge, proportional attention and (``"qkv"``) restore for a given plan -> (B, H, q_len, Dv).

    Always takes the merged path, even for a plan that merges nothing (all
    sizes 1): then it is dense attention up to rounding.
    """
    qkv = mode == "qkv"
    mg = _merge(q, k, v, attn_mask, plan, qkv)
    out = attend(mg.q, mg.k, mg.v, mg.bias, scale)
    if attn_mask is not None:
        out = zero_unseen(out, mg.bias)
    return restore(out, plan, mg.flat) if qkv else sdpa_layout(out)


def merged_attention_grads(
    grad_out: torch.Tensor,
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
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`merged_attention_torch` (also after the Triton forward).

    Recomputes the plan (a constant: the selection is discrete), then the
    merged tensors and bias, and differentiates by explicit math: the
    attention by :func:`attnrw.kernels.common.dense.attention_grads`,
    the means by spreading grad / size over the members, the restore by
    summing over them, the bias by the softmax weights of the members inside
    each log-sum-exp (and 1 / size for the query mean). Returns (dq, dk, dv,
    dmask); dmask has the mask's shape when ``mask_grad``, else it is empty.
    """
    check_inputs(q, k, v, attn_mask, is_causal, ratio, r, mode, protect)
    plan = merge_plan(k, attn_mask, ratio, r, protect)
    if plan.num_merged == 0:
        return attention_grads(grad_out, q, k, v, attn_mask, False, scale, 0.0, mask_grad)
    acc = acc_dtype(q.dtype)
    qkv = mode == "qkv"
    mg = _merge(q, k, v, attn_mask, plan, qkv)
    g = _restore_grad(grad_out.to(acc), plan, mg.flat) if qkv else grad_out
    want_bias_grad = mask_grad and attn_mask is not None
    dqm, dkm, dvm, dbias = attention_grads(g, mg.q, mg.k, mg.v, mg.bias, False, scale, 0.0, want_bias_grad)
    dq = unmerge_grad(dqm, plan, mg.flat, q.dtype) if qkv else dqm
    dk = unmerge_grad(dkm, plan, mg.flat, k.dtype)
    dv = unmerge_grad(dvm, plan, mg.flat, v.dtype)
    dmask = q.new_empty(0)
    if want_bias_grad and attn_mask is not None and mg.madd is not None:
        assert mg.key_lse is not None and mg.key_idx is not None
        dlse = dbias.to(acc)
        if qkv and mg.key_lse.shape[2] > 1:
            # Backward of the mean over member queries: each member row gets grad / size.
            n = plan.index.shape[1]
            rows = plan.index[:, None, :, None].expand(*mg.key_lse.shape[:2], n, mg.key_lse.shape[3])
            dlse = (dlse / plan.sizes[:, None, :, None].to(acc)).gather(2, rows)
        # d logsumexp / d member = the member's softmax weight within its merged key (0 when all are -inf).
        lse_at = mg.key_lse.gather(-1, mg.key_idx)
        none = lse_at == float("-inf")
        w = torch.exp(mg.madd - lse_at.masked_fill(none, 0.0)).masked_fill_(none, 0.0)
        dmask = reduce_to_shape(dlse.gather(-1, mg.key_idx) * w, attn_mask.shape).to(attn_mask.dtype)
    return dq.to(q.dtype), dk, dv, dmask

