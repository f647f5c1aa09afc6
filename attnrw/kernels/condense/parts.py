"""The two parts of the PyTorch forward of ``attnrw::condensed_attention``, chunk by chunk.

The work goes by batch element and groups of kv heads (:func:`chunks`),
and within those by ranges of query blocks, so temporary buffers stay
small: the window part (:func:`window_ranges`, :func:`window_part`) and the
condensed part, sinks then summaries (:func:`condensed_ranges`,
:func:`condensed_part`), merged by their log-sum-exps (:func:`merge_into`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnrw.kernels.common.shapes import additive, as_4d, blocked, cdiv, per_head, ranges
from attnrw.kernels.common.spans import Part, absorbed, add_user_mask, attend_math, attend_part, visible_slots
from attnrw.kernels.condense.blocking import (
    Layout,
    condensed_bias,
    condensed_reach,
    rows_seeing,
    window_bias,
    window_layout,
)
from attnrw.kernels.condense.summaries import Pooled, Sources, member_values, pool_blocks, row_groups


#: Bytes one chunk of (batch, kv heads) may hold in its copies of K and V.
_CHUNK_BYTES = 32 << 20


#: Elements one SDPA call may materialise (masks, gathered user mask, outputs); see ranges.
_RANGE_ELEMS = 1 << 22


@dataclass
class Chunk:
    """One batch element and a group of kv heads with their query heads."""

    batch: int
    heads: slice  # query heads
    kv_heads: slice
    q: torch.Tensor  # (h, S, D)
    k: torch.Tensor  # (kv_h, S, D)
    v: torch.Tensor  # (kv_h, S, Dv)
    mask: torch.Tensor | None  # this chunk's part of the user mask, 4-D (1, 1 or h, 1 or S, 1 or S)
    mask_index: tuple[slice, slice]  # where ``mask`` sits in the 4-D view of the whole mask
    values: torch.Tensor | None  # mask_values of ``mask`` (1 or h, 1 or nb, 1 or S)
    row_groups: torch.Tensor | None  # row_groups of ``mask`` (1 or h, nb·bs, 1 or ng) additive, or None


def chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, lay: Layout
) -> Iterator[Chunk]:
    """Split the work by batch element and by groups of kv heads (with all their query heads).

    Sized so the padded copies of K and V and the keys the summaries are
    pooled from stay near ``_CHUNK_BYTES`` (heap-reused from one chunk to the next).
    """
    batch, heads, seq, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    dims = k.shape[-1] + v.shape[-1]
    copy = 0 if lay.full else (lay.num_windows * lay.fold + lay.window_len) * dims
    per_kv_head = group * (copy + seq * dims) * 4  # window copies and the (per head) keys pooled from
    step = max(1, _CHUNK_BYTES // max(1, per_kv_head))
    step = cdiv(kv_heads, cdiv(kv_heads, step))  # equal chunks: a last chunk of one head runs slowly
    m4 = None if attn_mask is None else as_4d(attn_mask)
    for b in range(batch):
        shared = None  # what is read from a mask without a head axis: once per batch element
        for h0 in range(0, kv_heads, step):
            kvs = slice(h0, min(h0 + step, kv_heads))
            hs = slice(kvs.start * group, kvs.stop * group)
            mask, where, values, rows = None, (slice(None), slice(None)), None, None
            if m4 is not None:
                where = (slice(b, b + 1) if m4.shape[0] > 1 else slice(None), hs if m4.shape[1] > 1 else slice(None))
                mask = m4[where]
                if m4.shape[1] > 1 or shared is None:
                    values = member_values(mask[0], lay.block_size, seq)
                    rows = row_groups(mask[0], lay.geo)
                    if rows is not None:
                        pad = lay.num_blocks * lay.block_size - seq
                        rows = additive(F.pad(rows, (0, 0, 0, pad)), q.dtype)
                    if m4.shape[1] == 1:
                        shared = values, rows
                else:
                    values, rows = shared
            yield Chunk(b, hs, kvs, q[b, hs], k[b, kvs], v[b, kvs], mask, where, values, rows)


def window_keys(x: torch.Tensor, heads: int, lay: Layout) -> torch.Tensor:
    """(kv_h, S, D) -> (heads, nw, L, D): each window block's keys, an overlapping view of one padded copy."""
    kv, seq, dim = x.shape
    nw, length = lay.num_windows, lay.window_len
    if lay.full:
        return per_head(x, heads)[:, None].expand(heads, nw, seq, dim)
    total = (nw - 1) * lay.fold + length
    buf = x.new_empty(kv, heads // kv, total, dim)
    buf[:, :, : lay.before].zero_()
    buf[:, :, lay.before : lay.before + seq].copy_(x[:, None])
    buf[:, :, lay.before + seq :].zero_()
    return buf.view(heads, total, dim).unfold(1, length, lay.fold).transpose(-1, -2)


@dataclass
class Range:
    """Query rows of one SDPA call and the slots they attend to."""

    rows: slice  # rows of the blocked queries (block-major)
    blocks: slice  # the range's query blocks of ``block_size`` (condensed part)
    q: torch.Tensor  # (h, n_blocks or 1, rows per block, D)
    query_pos: torch.Tensor  # (n_blocks or 1, rows per block)
    part: Part
    slots: int


def window_ranges(c: Chunk, lay: Layout, budget: int) -> Iterator[Range]:
    """The window part of a chunk, by ranges of window blocks."""
    heads = c.q.shape[0]
    fold, length = lay.fold, lay.window_len
    qw = blocked(c.q, fold)
    kw, vw = window_keys(c.k, heads, lay), window_keys(c.v, heads, lay)
    pos, _ = window_layout(lay, c.q.device)
    bias = window_bias(lay, c.q.device, c.q.dtype)
    qpos = torch.arange(lay.num_windows * fold, device=c.q.device).view(-1, fold)
    per = fold * length * (heads if c.mask is not None else 1) + 2 * heads * fold * c.v.shape[-1]
    for r in ranges(lay.num_windows, per, budget):
        key_pos = pos[None, r]
        mask = add_user_mask(bias[None, r], c.mask, heads, qpos[r], key_pos)
        part = Part(kw[:, r], vw[:, r], mask, key_pos)
        yield Range(slice(r.start * fold, r.stop * fold), slice(0, 1), qw[:, r], qpos[r], part, length)


@dataclass
class Tables:
    """The condensed part's keys: sinks then summaries, per query head."""

    k: torch.Tensor  # (h, nq, sinks + groups, D) in q's dtype
    v: torch.Tensor  # (h, nq, sinks + groups, Dv)
    bias: torch.Tensor  # (1 or h, 1 or nq, 1, sinks + groups) in q's dtype (0 on the sinks)
    pooled: Pooled | None  # None: no groups (only sinks)


def tables(src: Sources, pooled: Pooled | None, nq: int, ns: int, heads: int, dtype: torch.dtype) -> Tables:
    """Put the sinks in front of the summaries, in q's dtype, one table per query head."""
    sink_k = src.k[:, None, :ns].expand(-1, nq, -1, -1)
    sink_v = src.v[:, None, :ns].expand(-1, nq, -1, -1)
    if pooled is None:
        zero = torch.zeros(1, 1, 1, ns, dtype=dtype, device=src.k.device)
        return Tables(per_head(sink_k.to(dtype), heads), per_head(sink_v.to(dtype), heads), zero, None)
    k_t = per_head(torch.cat([sink_k, pooled.k], dim=2).to(dtype), heads)
    v_t = per_head(torch.cat([sink_v, pooled.v], dim=2).to(dtype), heads)
    b = pooled.bias
    bias = torch.cat([b.new_zeros(*b.shape[:-1], ns), b], dim=-1)[:, :, None].to(dtype)
    return Tables(k_t, v_t, bias, pooled)


def condensed_ranges(
    c: Chunk, lay: Layout, src: Sources, scale: float, size_bias: bool, budget: int
) -> Iterator[tuple[Range, Tables]]:
    """The condensed part of a chunk by ranges of query blocks, with the tables each range reads.

    A range reads the slots its blocks see (causal: a prefix that grows
    along the sequence). Per-block summaries are pooled range by range,
    only for the groups the range sees; shared ones once for the chunk.
    """
    heads, bs, nb, dtype = c.q.shape[0], lay.block_size, lay.num_blocks, c.q.dtype
    geo = lay.geo
    ns = geo.num_sinks
    qb = blocked(c.q, bs)
    # With a user mask the summaries' bias (size included) comes from the tables, per batch and head.
    geo_bias = condensed_bias(lay, c.q.device, dtype, size_bias and c.values is None).view(nb, bs, -1)
    reach = condensed_reach(lay)
    qpos = torch.arange(nb * bs, device=c.q.device).view(nb, bs)
    shared = None
    if not src.per_block:
        pooled = pool_blocks(src, None, geo.num_groups, geo, scale, size_bias) if geo.num_groups else None
        shared = tables(src, pooled, 1, ns, heads, dtype)
    per = bs * lay.num_slots * (heads if (c.mask is not None or c.values is not None) else 1)
    per += 2 * heads * bs * c.v.shape[-1]
    if src.per_block:  # the block's tables and pooling weights
        per += heads * (lay.num_slots * (c.k.shape[-1] + c.v.shape[-1]) + 3 * lay.seq_len)
    # Causal: a range reads the slots its last block sees; short ranges waste little.
    cap = max(1, 512 // bs) if geo.is_causal else None
    for r in ranges(nb, per, budget, cap):
        slots = max(reach[r])
        if slots == 0:
            continue
        n = r.stop - r.start
        per_block = src.per_block
        if per_block:
            pooled = pool_blocks(src, r, slots - ns, geo, scale, size_bias) if slots > ns else None
            t = tables(src, pooled, n, ns, heads, dtype)
            q, query_pos, tk, tb = qb[:, r], qpos[r], slice(None), slice(None)
            mask = geo_bias[None, r, :, :slots]
        else:
            t = shared
            q, query_pos, tk, tb = qb[:, r].reshape(heads, 1, n * bs, -1), qpos[r].reshape(1, n * bs), slice(0, 1), slice(None)
            mask = geo_bias[r, :, :slots].reshape(1, 1, n * bs, slots)
        if c.values is not None:
            mask = mask + t.bias[:, tb, :, :slots]
        if c.row_groups is not None and slots > ns:
            rows = c.row_groups[:, r.start * bs : r.stop * bs, : slots - ns].unflatten(1, (n, bs))
            if not per_block:
                rows = rows.flatten(1, 2)[:, None]
            if mask.shape[0] < rows.shape[0]:
                mask = mask.expand(rows.shape[0], -1, -1, -1).clone()
            mask[..., ns:] += rows  # mask is a fresh tensor here (a user mask gave the bias above)
        # Slot positions: the sinks' keys, then the summaries (no position: seq_len).
        key_pos = torch.arange(slots, device=c.q.device)
        key_pos[ns:] = lay.seq_len
        key_pos = key_pos[None, None]
        if c.mask is not None and ns:
            sink = add_user_mask(mask[..., :ns], c.mask, heads, query_pos, key_pos[..., :ns])
            if sink.shape[0] != mask.shape[0]:
                mask = mask.expand(sink.shape[0], -1, -1, -1).clone()
            mask[..., :ns] = sink
        part = Part(t.k[:, tk, :slots], t.v[:, tk, :slots], mask, key_pos)
        yield Range(slice(r.start * bs, r.stop * bs), r, q, query_pos, part, slots), t


def attend_range(
    rg: Range, c: Chunk, scale: float, need_lse: bool, seeing: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA over one range; rows that see nothing give 0 (logsumexp -inf).

    Without a user mask those rows are known from the geometry (``seeing``,
    per blocked row), which spares a pass over the mask to find them.
    """
    if rg.q.shape[-1] != rg.part.v.shape[-1]:
        return attend_math(rg.q, rg.part, scale)
    if c.mask is not None:
        return attend_part(rg.q, rg.part, scale, need_lse=need_lse, may_be_empty=True)
    o, m = attend_part(rg.q, rg.part, scale, need_lse=need_lse, may_be_empty=False)
    vis = seeing[rg.rows].view(rg.q.shape[1:3])
    if not bool(vis.all()):
        o = o.masked_fill(~vis[..., None], 0.0)
        m = None if m is None else m.masked_fill(~vis, float("-inf"))
    return o, m


def _absorbed_counts(
    counts: torch.Tensor | None, c: Chunk, rg: Range, lse: torch.Tensor, total_rows: int
) -> torch.Tensor | None:
    """Record the visible slots of the range's rows a finfo.min mask absorbed (see :mod:`attnrw.kernels.common.spans`).

    Only with a float user mask, and only once such a row turns up;
    ``counts`` (h, total_rows) fp32, created then, holds 0 elsewhere.
    """
    if c.mask is None or not c.mask.is_floating_point() or not bool(absorbed(lse).any()):
        return counts
    if counts is None:
        counts = torch.zeros(lse.shape[0], total_rows, dtype=torch.float32, device=lse.device)
    counts[:, rg.rows] = visible_slots(rg.part.mask, lse.shape).flatten(1, 2)
    return counts


def window_part(
    c: Chunk, lay: Layout, scale: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Window part of one chunk: (out (h, nw·fold, Dv), logsumexp (h, nw·fold) fp32 or None, absorbed counts or None)."""
    heads = c.q.shape[0]
    rows = lay.num_windows * lay.fold
    out = c.q.new_empty(heads, rows, c.v.shape[-1])
    lse = torch.empty(heads, rows, dtype=torch.float32, device=c.q.device) if need_lse else None
    counts = None
    seeing = rows_seeing(lay, c.q.device)[0]
    for rg in window_ranges(c, lay, _RANGE_ELEMS):
        o, m = attend_range(rg, c, scale, need_lse, seeing)
        out[:, rg.rows] = o.flatten(1, 2)
        if lse is not None:
            lse[:, rg.rows] = m.flatten(1, 2)
            counts = _absorbed_counts(counts, c, rg, m, rows)
    return out, lse, counts


def condensed_part(
    c: Chunk, lay: Layout, src: Sources, scale: float, size_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Condensed part of one chunk: (out (h, nb·bs, Dv), logsumexp (h, nb·bs) fp32, -inf where nothing
    is seen; absorbed counts or None)."""
    heads = c.q.shape[0]
    rows = lay.num_blocks * lay.block_size
    out = c.q.new_zeros(heads, rows, c.v.shape[-1])
    lse = torch.full((heads, rows), float("-inf"), dtype=torch.float32, device=c.q.device)
    counts = None
    seeing = rows_seeing(lay, c.q.device)[1]
    for rg, _ in condensed_ranges(c, lay, src, scale, size_bias, _RANGE_ELEMS):
        o, m = attend_range(rg, c, scale, True, seeing)
        out[:, rg.rows] = o.flatten(1, 2)
        lse[:, rg.rows] = m.flatten(1, 2)
        counts = _absorbed_counts(counts, c, rg, m, rows)
    return out, lse, counts


def merge_into(
    ow: torch.Tensor,
    lw: torch.Tensor,
    oc: torch.Tensor,
    lc: torch.Tensor,
    cw: torch.Tensor | None = None,
    cc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two parts' attention outputs by their log-sum-exps -> (out, logsumexp).

    ow, oc (h, S, Dv); lw, lc (h, S) fp32. Rows that see nothing in either
    part give 0. ``cw``, ``cc`` (h, S): the parts' visible slots on rows a
    finfo.min mask absorbed (None: none), which weigh those rows instead.
    fp32/fp64 outputs are merged into ``ow`` in place (no temporaries the
    size of the output); half ones in fp32.
    """
    lse = torch.logaddexp(lw, lc)
    safe = lse.masked_fill(lse == float("-inf"), 0.0)
    a, b = torch.exp(lw - safe)[..., None], torch.exp(lc - safe)[..., None]
    if cw is not None or cc is not None:
        hit = absorbed(lse)[..., None]
        cw = torch.zeros_like(lw) if cw is None else cw
        cc = torch.zeros_like(lc) if cc is None else cc
        total = (cw + cc).clamp(min=1.0)[..., None]
        a, b = torch.where(hit, cw[..., None] / total, a), torch.where(hit, cc[..., None] / total, b)
    if ow.dtype in (torch.float32, torch.float64):
        return ow.mul_(a.to(ow.dtype)).addcmul_(oc, b.to(ow.dtype)), lse
    return ow.float() * a + oc.float() * b, lse
