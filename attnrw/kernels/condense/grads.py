"""The backward of ``attnrw::condensed_attention`` (also used after the Triton forward).

Recomputes both parts range by range over the same slots as the forward
(:mod:`attnrw.kernels.condense.parts`) and applies the gradient formulas by
hand, through the pooling too (to keys, values, the probe's queries and a
float mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnrw.kernels.common.shapes import acc_dtype, blocked, mask_grad_out, reduce_to_shape
from attnrw.kernels.common.spans import scatter_mask_grad
from attnrw.kernels.condense.blocking import Layout, has_condensed_part, make_layout
from attnrw.kernels.condense.layout import check_inputs
from attnrw.kernels.condense.parts import (
    Chunk,
    Range,
    chunks,
    condensed_part,
    condensed_ranges,
    merge_into,
    window_part,
    window_ranges,
)
from attnrw.kernels.condense.summaries import Pooled, Sources, mask_values, mask_values_backward, pool_backward, sources


#: Elements of one score matrix in the backward, which materialises it.
_BACKWARD_RANGE_ELEMS = 1 << 21


def _slot_grads(
    rg: Range, g: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, scale: float, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute one range's probabilities; return (ds, dq, dk_slots, dv_slots).

    g (h, n, rows, Dv), lse and delta (h, n, rows): the blocked gradient of
    the output, the row's log-sum-exp over all its parts, and rowsum(g·o).
    """
    q, kk, vv = rg.q.to(acc), rg.part.k.to(acc), rg.part.v.to(acc)
    s = (q @ kk.transpose(-1, -2)) * scale + rg.part.mask.to(acc)
    p = torch.exp(s - lse[..., None])
    ds = p * (g @ vv.transpose(-1, -2) - delta[..., None])
    return ds, (ds @ kk) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ g


def condensed_attention_grads(
    grad_out: torch.Tensor,
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
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`condensed_attention_torch` (also used after the Triton forward).

    Recomputes each part's probabilities over the same slots as the forward
    (fp32 for half inputs), normalised over both parts; scatters the slots'
    key and value gradients to their positions (exact keys, sinks) or into
    the summary tables, then back through the pooling (to keys, values, the
    probe's queries and the mask). Returns (dq, dk, dv, dmask); dmask has
    ``attn_mask``'s shape when ``mask_grad``, else it is empty.
    """
    check_inputs(q, k, v, attn_mask, recent, group, sinks, pooling, block_size)
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    group_q = heads // kv_heads
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    # One extra key row catches slots without a key (position seq), whose gradients are 0.
    dk_h = torch.zeros(batch, heads, seq + 1, dim, dtype=acc, device=q.device)
    dv_h = torch.zeros(batch, heads, seq + 1, v.shape[-1], dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    dm4 = None
    if mask_grad and attn_mask is not None and attn_mask.is_floating_point():
        dm4 = torch.zeros((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape), dtype=acc, device=q.device)
    if seq == 0 or batch * heads == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), mask_grad_out(dm4, attn_mask, q)
    lay = make_layout(q, recent, group, sinks, is_causal, block_size)
    two = has_condensed_part(lay)
    for c in chunks(q, k, v, attn_mask, lay):
        ow, lw, cw = window_part(c, lay, scale, need_lse=True)
        ow, lw = ow[:, :seq].to(acc), lw[:, :seq]
        src = None
        if two:
            src = sources(c.q, c.k, c.v, c.values, pooling, block_size)
            oc, lc, cc = condensed_part(c, lay, src, scale, size_bias)
            cw, cc = (None if x is None else x[:, :seq] for x in (cw, cc))
            o, lse = merge_into(ow, lw, oc[:, :seq], lc[:, :seq], cw, cc)
        else:
            o, lse = ow, lw
        g = grad_out[c.batch, c.heads].to(acc)
        delta = (g * o).sum(-1)
        lse = lse.masked_fill(lse == float("-inf"), 0.0)  # rows seeing nothing: p = 0
        grads = _ChunkGrads(c, dq[c.batch, c.heads], dk_h[c.batch, c.heads], dv_h[c.batch, c.heads], dk, dv, dm4)
        _window_backward(c, lay, g, lse, delta, scale, acc, grads)
        if src is not None:
            _condensed_backward(c, lay, src, g, lse, delta, scale, size_bias, acc, grads)

    dk += dk_h[:, :, :seq].unflatten(1, (kv_heads, group_q)).sum(2)
    dv += dv_h[:, :, :seq].unflatten(1, (kv_heads, group_q)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), mask_grad_out(dm4, attn_mask, q)


@dataclass
class _ChunkGrads:
    """Where one chunk's gradients go (views into the call's accumulators)."""

    c: Chunk
    dq: torch.Tensor  # (h, S, D)
    dk: torch.Tensor  # (h, S + 1, D) per query head; row S catches slots without a key
    dv: torch.Tensor  # (h, S + 1, Dv)
    dk_kv: torch.Tensor  # (batch, kv_heads, S, D): for summaries pooled per kv head
    dv_kv: torch.Tensor
    dm4: torch.Tensor | None  # the mask's gradient (4-D), when asked for


def _blocked_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(h, S) or (h, S, d) -> (h, nb, size) or (h, nb, size, d), zero-padded."""
    return blocked(x[..., None], size)[..., 0] if x.dim() == 2 else blocked(x, size)


def _window_backward(
    c: Chunk, lay: Layout, g: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, scale: float, acc: torch.dtype, out: _ChunkGrads
) -> None:
    h, seq, fold = c.q.shape[0], lay.seq_len, lay.fold
    heads_idx = torch.arange(h, device=c.q.device)[:, None, None]
    g_w, l_w, d_w = _blocked_rows(g, fold), _blocked_rows(lse, fold), _blocked_rows(delta, fold)
    for rg in window_ranges(c, lay, _BACKWARD_RANGE_ELEMS):
        wr = slice(rg.rows.start // fold, rg.rows.stop // fold)
        ds, dq_r, dk_r, dv_r = _slot_grads(rg, g_w[:, wr], l_w[:, wr], d_w[:, wr], scale, acc)
        lo, hi = rg.rows.start, min(rg.rows.stop, seq)
        out.dq[:, lo:hi] += dq_r.flatten(1, 2)[:, : hi - lo]
        kpos = rg.part.key_pos.expand(h, -1, -1)
        out.dk.index_put_((heads_idx, kpos), dk_r, accumulate=True)
        out.dv.index_put_((heads_idx, kpos), dv_r, accumulate=True)
        if out.dm4 is not None and c.mask is not None:
            scatter_mask_grad(out.dm4, c.mask, c.mask_index, h, rg.query_pos, rg.part.key_pos, ds)


def _condensed_backward(
    c: Chunk,
    lay: Layout,
    src: Sources,
    g: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
    size_bias: bool,
    acc: torch.dtype,
    out: _ChunkGrads,
) -> None:
    """Gradients through the sinks and summaries of one chunk (then back through the pooling)."""
    h, seq, bs = c.q.shape[0], lay.seq_len, lay.block_size
    ns, ng = lay.geo.num_sinks, lay.geo.num_groups
    mask_grad = out.dm4 is not None and c.values is not None
    g_b, l_b, d_b = _blocked_rows(g, bs), _blocked_rows(lse, bs), _blocked_rows(delta, bs)
    # Gradients of the member values (summed over ranges, then through the mask reduction).
    da_all = torch.zeros(c.values.shape, dtype=torch.float32, device=c.q.device) if mask_grad else None
    shared = None  # shared summaries: table gradients summed over ranges, pooled back once
    if not src.per_block:
        shared = [torch.zeros(h, 1, ng, c.k.shape[-1], dtype=acc, device=c.q.device),
                  torch.zeros(h, 1, ng, c.v.shape[-1], dtype=acc, device=c.q.device),
                  torch.zeros(h, 1, ng, dtype=torch.float32, device=c.q.device)]  # fmt: skip
    pooled = None
    for rg, t in condensed_ranges(c, lay, src, scale, size_bias, _BACKWARD_RANGE_ELEMS):
        shape = (h, *rg.q.shape[1:3])
        r = rg.blocks
        ds, dq_r, dk_r, dv_r = _slot_grads(
            rg, g_b[:, r].reshape(*shape, -1), l_b[:, r].reshape(shape), d_b[:, r].reshape(shape), scale, acc
        )
        lo, hi = rg.rows.start, min(rg.rows.stop, seq)
        out.dq[:, lo:hi] += dq_r.flatten(1, 2)[:, : hi - lo]
        # Sinks: the tables hold copies of the sink keys (one per table block).
        out.dk[:, :ns] += dk_r[:, :, :ns].sum(1)
        out.dv[:, :ns] += dv_r[:, :, :ns].sum(1)
        if out.dm4 is not None and c.mask is not None and ns:
            scatter_mask_grad(out.dm4, c.mask, c.mask_index, h, rg.query_pos, rg.part.key_pos[..., :ns], ds[..., :ns])
        if t.pooled is None:
            continue
        dks, dvs, dbs = dk_r[:, :, ns:], dv_r[:, :, ns:], ds[..., ns:].sum(-2).float()
        if shared is None:
            _summary_backward(c, t.pooled, dks, dvs, dbs, r, src, lay, scale, size_bias, out, da_all)
        else:
            groups = rg.slots - ns
            shared[0][:, :, :groups] += dks
            shared[1][:, :, :groups] += dvs
            shared[2][:, :, :groups] += dbs
            pooled = t.pooled
    if shared is not None and pooled is not None:
        _summary_backward(c, pooled, *shared, None, src, lay, scale, size_bias, out, da_all)
    if da_all is not None:
        m3 = c.mask[0]
        da = da_all.sum(-1, keepdim=True) if m3.shape[-1] == 1 else da_all
        raw = mask_values(m3, bs, seq) if m3.shape[-2] > 1 else m3.float()
        out.dm4[c.mask_index][0] += reduce_to_shape(mask_values_backward(da, m3, raw, bs), m3.shape).to(out.dm4.dtype)


def _summary_backward(
    c: Chunk,
    p: Pooled,
    dks: torch.Tensor,
    dvs: torch.Tensor,
    dbs: torch.Tensor,
    blocks: slice | None,
    src: Sources,
    lay: Layout,
    scale: float,
    size_bias: bool,
    out: _ChunkGrads,
    da_all: torch.Tensor | None,
) -> None:
    """Back through the pooling of summaries ``p`` (query blocks ``blocks``, None: shared by all).

    dks (h, nq, groups, D), dvs, dbs (h, nq, groups): gradients of the table
    entries of each query head.
    """
    h, seq, bs = c.q.shape[0], lay.seq_len, lay.block_size
    ns = lay.geo.num_sinks
    hk, groups = p.kg.shape[0], p.kg.shape[1]
    if hk != h:  # pooled per kv head and repeated for its query heads
        dks, dvs = dks.unflatten(0, (hk, -1)).sum(1), dvs.unflatten(0, (hk, -1)).sum(1)
    dbias = None if da_all is None else reduce_to_shape(dbs, p.bias.shape)
    valid = min(groups * lay.geo.group, seq - ns)
    dkx, dvx, dprobe, da = pool_backward(p, dks, dvs, dbias, scale, size_bias, valid)
    if hk == h:
        out.dk[:, ns : ns + valid] += dkx
        out.dv[:, ns : ns + valid] += dvx
    else:
        out.dk_kv[c.batch, c.kv_heads, ns : ns + valid] += dkx
        out.dv_kv[c.batch, c.kv_heads, ns : ns + valid] += dvx
    if dprobe is not None:  # probe = mean of the block's real queries
        b = blocks if blocks is not None else slice(0, lay.num_blocks)
        starts = torch.arange(b.start, b.stop, device=c.q.device) * bs
        counts = (seq - starts).clamp(max=bs).to(dprobe.dtype)
        per_row = (dprobe / counts[:, None]).repeat_interleave(bs, dim=1)
        lo, hi = b.start * bs, min(b.stop * bs, seq)
        out.dq[:, lo:hi] += per_row[:, : hi - lo].to(out.dq.dtype)
    if da is not None and da_all is not None:
        rows = blocks if (blocks is not None and da_all.shape[1] > 1) else slice(None)
        da_all[:, rows, ns : ns + valid] += da
