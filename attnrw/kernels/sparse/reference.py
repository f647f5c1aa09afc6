"""Sparse attention (sinks + sliding window + block top-k) in pure PyTorch.

This is the CPU path of ``attnrw::sparse_attention`` and the oracle its
Triton kernel is tested against. Shapes: ``q`` (batch, heads, S, head_dim),
``k`` (batch, kv_heads, S, head_dim), ``v`` (batch, kv_heads, S, v_dim);
``heads`` a multiple of ``kv_heads`` (query head ``h`` uses kv head
``h // (heads // kv_heads)``). Queries and keys are one aligned sequence.

Which keys query ``i`` sees (positions from 0):

* causal: ``i - window < j <= i`` (the query itself counts);
  bidirectional: ``|i - j| <= window // 2``;
* the first ``sinks`` keys ``j < sinks`` (causal: still only ``j <= i``);
* with ``topk > 0``: the ``topk`` key blocks (``[b·bs, (b+1)·bs)``) with the
  highest pooled score (mean query of the query's block · mean key of the
  block), chosen at run time per batch and head among the blocks that do not
  intersect, even partly, the query block's band or the sinks (causal: only
  earlier blocks, and still only ``j <= i``); see
  :func:`attnrw.kernels.sparse.layout.select_blocks`;
* then ``attn_mask`` on top, as in ``F.scaled_dot_product_attention``
  (bool: True = may attend; float: added to the scores). A query that sees
  no key (possible only through the mask) outputs 0.

A window that covers the sequence gives dense attention.

How it is computed (cost O(S·(W + sinks + k·bs))): queries are cut into
blocks of ``bs`` folded into the batch axis of 4-D SDPA calls (5-D inputs
take a slow path); each query block attends to

* its *window*: the key blocks its band touches, read as an overlapping
  strided view of one padded copy of the keys (no gather). The sinks ride
  along: every block row of that copy starts with the first ``sinks`` keys,
  and the mask counts only the copy in the window's first row. A cached
  per-block additive mask gives the exact band edges;
* its top-k blocks (whole block rows gathered), and the sinks when there are
  more than a block holds, each as a separate SDPA call; the partial results
  are merged by their log-sum-exp, so no key set is ever concatenated.

The user mask is read only at the (query, key) pairs used, through its
broadcast view. The work goes by batch element and groups of kv heads, and
within those by ranges of query blocks, so temporary buffers stay small.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attnrw.kernels.common.dense import dense_attention, soft_cap, soft_cap_slope
from attnrw.kernels.common.shapes import acc_dtype, additive, as_4d, blocked, cdiv, mask_grad_out, per_head, ranges
from attnrw.kernels.common.spans import Part, add_user_mask, attend_part, merge_partials, scatter_mask_grad
from attnrw.kernels.sparse.layout import band_reach, check_inputs, select_blocks

#: Bytes of block rows (the copy of K and V) one chunk of work may hold; see _chunks.
_CHUNK_BYTES = 16 << 20
#: Elements the forward may materialise for one SDPA call (gathered keys, masks, output); see _fold_elems.
_FOLD_CHUNK_ELEMS = 1 << 22
#: Elements of one score matrix in the backward, which materialises it (keeps memory bounded).
_BACKWARD_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class _Geometry:
    """Block layout of one call: how the keys of each query block are laid out."""

    seq_len: int
    block_size: int
    num_blocks: int
    before: int  # key blocks of the band before the query block
    after: int  # and after it
    row_sinks: int  # sink keys copied at the start of every block row (0 or min(sinks, S))
    extra_sinks: int  # sink keys appended once per query block instead (when too many to copy per row)
    window: int
    sinks: int
    is_causal: bool

    @property
    def band_blocks(self) -> int:
        return self.before + self.after + 1

    @property
    def row_len(self) -> int:
        return self.block_size + self.row_sinks


def _geometry(seq_len: int, block_size: int, window: int, sinks: int, is_causal: bool) -> _Geometry:
    before, after = band_reach(seq_len, block_size, window, is_causal)
    eff_sinks = min(sinks, seq_len)
    # Copying the sinks into every row costs band_blocks·sinks keys per query
    # instead of sinks; that stays within the band's own cost while
    # sinks <= block_size, and saves a gather of the whole band.
    row = eff_sinks if eff_sinks <= block_size else 0
    return _Geometry(
        seq_len, block_size, cdiv(seq_len, block_size), before, after, row, eff_sinks - row, window, sinks, is_causal
    )


def _blocked_rows(x: torch.Tensor, geo: _Geometry, heads: int) -> torch.Tensor:
    """Copy (batch, kv_heads, S, D) into (batch * heads, rows, row_sinks + bs, D) block rows.

    Row ``r`` holds the sink keys, then key block ``r - before`` (zeros outside
    the sequence). ``heads`` counts query heads: GQA heads are expanded by the same copy.
    """
    batch, kv_heads, seq_len, dim = x.shape
    group = heads // kv_heads
    bs, nb, rs = geo.block_size, geo.num_blocks, geo.row_sinks
    rows = nb + geo.before + geo.after
    buf = x.new_empty(batch, kv_heads, group, rows, geo.row_len, dim)
    src = x[:, :, None]
    full = seq_len // bs
    body = buf[:, :, :, geo.before : geo.before + nb, rs:]
    body[:, :, :, :full].copy_(src[..., : full * bs, :].unflatten(-2, (full, bs)))
    if full < nb:
        rem = seq_len - full * bs
        body[:, :, :, full, :rem].copy_(src[..., full * bs :, :])
        body[:, :, :, full, rem:].zero_()
    buf[:, :, :, : geo.before, rs:].zero_()
    buf[:, :, :, geo.before + nb :, rs:].zero_()
    if rs:
        buf[..., :rs, :].copy_(src[..., None, :rs, :])
    return buf.view(batch * heads, rows, geo.row_len, dim)


def _window_view(rows: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """(n, rows, P, D) -> (n, nb, band_blocks * P, D): each query block's window, an overlapping view."""
    n, nrows, row_len, dim = rows.shape
    flat = rows.view(n, nrows * row_len, dim)
    return flat.unfold(1, geo.band_blocks * row_len, row_len).transpose(-1, -2)


@functools.lru_cache(maxsize=16)
def _window_layout(geo: _Geometry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key position of every window slot (nb, L_window) and which (query, slot) pairs attend (nb, bs, L_window).

    Unused slots get position ``seq_len``. A sink copy counts only in the
    window's first row (every row carries one); a band slot counts when its
    key is in the sequence and is not a sink (its sink slot counts it).
    Depends only on ints, so it is cached (callers must not modify the
    result): a model's layers share one layout.
    """
    bs, rs, seq_len = geo.block_size, geo.row_sinks, geo.seq_len
    nb, nbb, row_len = geo.num_blocks, geo.band_blocks, geo.row_len
    qb = torch.arange(nb, device=device, dtype=torch.int32)[:, None, None]
    off = torch.arange(nbb, device=device, dtype=torch.int32)[None, :, None]
    t = torch.arange(row_len, device=device, dtype=torch.int32)[None, None, :]
    is_sink = t < rs
    band_pos = (qb - geo.before + off) * bs + (t - rs)
    counted = torch.where(is_sink, off == 0, (band_pos >= geo.sinks) & (band_pos >= 0) & (band_pos < seq_len))
    pos = torch.where(is_sink, t, band_pos).masked_fill(~counted, seq_len).flatten(1).long()

    # In a band slot, i - j = r + (before - o)·bs - (t - rs) does not depend on the query
    # block: build that (bs, L_window) pattern once rather than an (nb, bs, L_window) one.
    r = torch.arange(bs, device=device, dtype=torch.int32)[:, None]
    d = r + ((geo.before - off) * bs - (t - rs)).flatten()[None, :]
    if geo.is_causal:
        band_ok = (d >= 0) & (d < geo.window)
    else:
        band_ok = d.abs() <= geo.window // 2
    pattern = band_ok | is_sink.expand(1, nbb, -1).flatten()[None, :]
    query_pos = torch.arange(nb * bs, device=device).view(nb, bs)
    allowed = pattern[None] & counted.flatten(1)[:, None, :] & (query_pos < seq_len)[:, :, None]
    if geo.is_causal and rs:
        # The counted sink copies are the first rs slots; a causal query sees sink j only if j <= i.
        allowed[:, :, :rs] &= torch.arange(rs, device=device)[None, None, :] <= query_pos[:, :, None]
    return pos, allowed


@functools.lru_cache(maxsize=16)
def _window_bias(geo: _Geometry, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The window's allowed mask as an additive 0 / -inf mask (nb, bs, L_window) in ``dtype``.

    SDPA would otherwise convert the bool mask to this on every call.
    """
    return additive(_window_layout(geo, device)[1], dtype)


@dataclass
class _Chunk:
    """One batch element and a group of kv heads with their query heads, laid out in blocks."""

    batch: int
    heads: slice  # query heads
    q: torch.Tensor  # (h, nb, bs, D)
    k: torch.Tensor  # (1, kv_h, S, D), for sinks appended per block
    v: torch.Tensor  # (1, kv_h, S, Dv)
    k_rows: torch.Tensor  # (h, rows, row_len, D), see _blocked_rows
    v_rows: torch.Tensor  # (h, rows, row_len, Dv)
    mask: torch.Tensor | None  # this chunk's part of the user mask, broadcastable to (1, h, S, S)
    mask_index: tuple[slice, slice]  # where ``mask`` sits in the 4-D view of the whole mask
    blocks: torch.Tensor | None  # (h, nb, kk) top-k key blocks, -1 = none


def _chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    blocks: torch.Tensor | None,
    geo: _Geometry,
) -> Iterator[_Chunk]:
    """Split the work by batch element and by groups of kv heads (with all their query heads).

    The block rows are a copy of K and V. Kept to about ``_CHUNK_BYTES`` a
    chunk, they come back from the allocator's heap on the next chunk and the
    next call; larger buffers are fresh mmap pages (glibc's threshold is at
    most 32 MiB) whose page faults cost as much as the copy itself.
    """
    batch, heads = q.shape[:2]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    rows = geo.num_blocks + geo.before + geo.after
    per_kv_head = group * rows * geo.row_len * (k.shape[-1] + v.shape[-1]) * k.element_size()
    step = max(1, _CHUNK_BYTES // per_kv_head)
    m4 = None if attn_mask is None else as_4d(attn_mask)
    for b in range(batch):
        for h0 in range(0, kv_heads, step):
            kvs = slice(h0, min(h0 + step, kv_heads))
            hs = slice(kvs.start * group, kvs.stop * group)
            k_c, v_c = k[b : b + 1, kvs], v[b : b + 1, kvs]
            mask, where = None, (slice(None), slice(None))
            if m4 is not None:
                where = (slice(b, b + 1) if m4.shape[0] > 1 else slice(None), hs if m4.shape[1] > 1 else slice(None))
                mask = m4[where]
            yield _Chunk(
                b, hs, blocked(q[b, hs], geo.block_size), k_c, v_c,
                _blocked_rows(k_c, geo, hs.stop - hs.start), _blocked_rows(v_c, geo, hs.stop - hs.start),
                mask, where, None if blocks is None else blocks[b, hs],
            )  # fmt: skip


def _slot_counts(c: _Chunk, geo: _Geometry) -> list[int]:
    """Key slots per query block of each part :func:`_fold` makes (window, extra sinks, top-k)."""
    counts = [geo.band_blocks * geo.row_len]
    if geo.extra_sinks:
        counts.append(geo.extra_sinks)
    if c.blocks is not None:
        counts.append(c.blocks.shape[-1] * geo.row_len)
    return counts


def _fold_elems(c: _Chunk, geo: _Geometry) -> int:
    """Elements the forward materialises per query block of a chunk (gathered keys, masks, outputs)."""
    n, _, bs, dim = c.q.shape
    dv = c.v.shape[-1]
    slots = _slot_counts(c, geo)
    gathered = (slots[-1] if c.blocks is not None else 0) * (dim + dv)  # window and sinks are views
    masks = bs * sum(slots) if c.mask is not None else bs * sum(slots[1:])
    return n * (gathered + masks + 2 * len(slots) * bs * dv)


@dataclass
class _Folded:
    """Query blocks ``qbs`` of a chunk folded into the batch axis, and the key parts they attend to.

    Every key a query sees has exactly one slot with a finite mask, in one of the parts.
    """

    q: torch.Tensor  # (n, nb, bs, D)
    query_pos: torch.Tensor  # (nb, bs) int64 position of each query row (>= seq_len: padding)
    parts: list[Part]


def _fold(c: _Chunk, geo: _Geometry, qbs: slice) -> _Folded:
    """The queries of blocks ``qbs`` of a chunk and the parts of keys they see.

    Parts: the window (band blocks with the sink copies: a view, no copy),
    then the sinks if they did not fit in the rows, then the top-k blocks
    (whole block rows gathered, their sink copies masked). The sparsity is an
    additive 0 / -inf mask in the inputs' dtype (SDPA would convert a bool
    one on every call); the user mask is read at the slots used and added.
    """
    n, nb, bs, _ = c.q.shape
    seq_len, dev, dtype = geo.seq_len, c.q.device, c.q.dtype
    count = qbs.stop - qbs.start
    query_pos = torch.arange(nb * bs, device=dev).view(nb, bs)[qbs]
    wpos, _ = _window_layout(geo, dev)
    parts = [
        Part(
            _window_view(c.k_rows, geo)[:, qbs],
            _window_view(c.v_rows, geo)[:, qbs],
            _window_bias(geo, dev, dtype)[None, qbs],
            wpos[None, qbs],
        )
    ]
    if geo.extra_sinks:
        e = geo.extra_sinks
        epos = torch.arange(e, device=dev)
        seen = (epos <= query_pos[:, :, None])[None] if geo.is_causal else torch.ones(1, 1, 1, e, dtype=torch.bool, device=dev)
        parts.append(
            Part(
                per_head(c.k[0, :, :e], n)[:, None].expand(n, count, e, -1),
                per_head(c.v[0, :, :e], n)[:, None].expand(n, count, e, -1),
                additive(seen, dtype).expand(1, count, -1, -1),
                epos.expand(1, count, e),
            )
        )
    if c.blocks is not None:
        blk = c.blocks[:, qbs]
        kk = blk.shape[-1]
        # Gather whole block rows (one contiguous copy each); their sink copies are masked out.
        rows = (torch.arange(n, device=dev)[:, None, None] * c.k_rows.shape[1] + blk.clamp(min=0) + geo.before).flatten()
        t = torch.arange(geo.row_len, device=dev) - geo.row_sinks
        tpos = (blk[..., None] * bs + t).flatten(2)
        ok = ((blk >= 0)[..., None] & (t >= 0)).flatten(2) & (tpos < seq_len)
        # Causal candidates lie strictly before the query block (its own block is always in
        # its band), so every key of a chosen block precedes all its queries: no j <= i test.
        parts.append(
            Part(
                c.k_rows.flatten(0, 1).index_select(0, rows).view(n, count, kk * geo.row_len, -1),
                c.v_rows.flatten(0, 1).index_select(0, rows).view(n, count, kk * geo.row_len, -1),
                additive(ok[:, :, None, :], dtype),
                tpos.masked_fill(~ok, seq_len),
            )
        )
    for p in parts:
        p.mask = add_user_mask(p.mask, c.mask, n, query_pos, p.key_pos)
    return _Folded(c.q[:, qbs], query_pos, parts)


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    window: int,
    sinks: int,
    topk: int,
    block_size: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Sinks + sliding window (+ block top-k) attention; see the module docstring for the rule.

    ``softcap`` > 0 caps each scaled score (``softcap · tanh(s / softcap)``) before the
    window and the mask apply, as the dense op does; the capped parts are written out.

    q (batch, heads, S, D), k (batch, kv_heads, S, D), v (batch, kv_heads, S, Dv),
    attn_mask None or broadcastable to (batch, heads, S, S) -> (batch, heads, S, Dv)
    in q's dtype. Raises ``ValueError`` when q_len != kv_len.
    """
    check_inputs(q, k, v, attn_mask, window, sinks, topk, block_size)
    batch, heads, seq_len, _ = q.shape
    covers = window >= seq_len if is_causal else window // 2 >= seq_len - 1
    if covers and attn_mask is None:
        # Every key is visible: one fused dense call is exact and much faster
        # than the chunked path (no mask, so no row can be left without keys).
        return dense_attention(q, k, v, None, is_causal, scale, softcap).contiguous()
    geo = _geometry(seq_len, block_size, window, sinks, is_causal)
    blocks = select_blocks(q, k, topk, block_size, window, sinks, is_causal)
    out = q.new_empty((batch, heads, seq_len, v.shape[-1]))
    for c in _chunks(q, k, v, attn_mask, blocks, geo):
        for qbs in ranges(geo.num_blocks, _fold_elems(c, geo), _FOLD_CHUNK_ELEMS):
            f = _fold(c, geo, qbs)
            results = [
                attend_part(f.q, p, scale, need_lse=len(f.parts) > 1, may_be_empty=c.mask is not None or i > 0,
                            softcap=softcap)
                for i, p in enumerate(f.parts)
            ]
            if len(results) == 1:
                o = results[0][0]
            else:
                # A float user mask may hold finfo.min rows: the merge needs the parts' masks for them.
                masks = [p.mask for p in f.parts] if c.mask is not None and c.mask.is_floating_point() else None
                o = merge_partials([r[0] for r in results], [r[1] for r in results], masks)
            lo, hi = qbs.start * block_size, min(qbs.stop * block_size, seq_len)
            out[c.batch, c.heads, lo:hi] = o.flatten(1, 2)[:, : hi - lo]
    return out


def sparse_attention_grads(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    window: int,
    sinks: int,
    topk: int,
    block_size: int,
    softcap: float,
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`sparse_attention_torch` (also used after the Triton forward).

    Recomputes each query block's probabilities over the same key slots as
    the forward (fp32 for half inputs), normalised over all its parts, then
    scatters key and value gradients back to their positions. The top-k
    choice is treated as a constant. Returns (dq, dk, dv, dmask); dmask has
    ``attn_mask``'s shape when ``mask_grad``, else it is empty. Memory is
    bounded by going through the same chunks as the forward, in smaller
    ranges of query blocks.
    """
    check_inputs(q, k, v, attn_mask, window, sinks, topk, block_size)
    batch, heads, seq_len, dim = q.shape
    group = heads // k.shape[1]
    geo = _geometry(seq_len, block_size, window, sinks, is_causal)
    blocks = select_blocks(q, k, topk, block_size, window, sinks, is_causal)
    acc = acc_dtype(q.dtype)
    g_all = blocked(grad_out.flatten(0, 1), block_size).unflatten(0, (batch, heads))
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    # One extra key row catches the unused slots (position seq_len), whose gradients are 0.
    dk = torch.zeros(batch, heads, seq_len + 1, dim, dtype=acc, device=q.device)
    dv = torch.zeros(batch, heads, seq_len + 1, v.shape[-1], dtype=acc, device=q.device)
    dm4 = None
    if mask_grad and attn_mask is not None:
        dm4 = torch.zeros((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape), dtype=acc, device=q.device)
    for c in _chunks(q, k, v, attn_mask, blocks, geo):
        n = c.q.shape[0]
        rows = torch.arange(n, device=q.device)[:, None, None]
        dk_c, dv_c = dk[c.batch, c.heads], dv[c.batch, c.heads]  # views: scattered into in place
        per_block = n * block_size * sum(_slot_counts(c, geo))
        for qbs in ranges(geo.num_blocks, per_block, _BACKWARD_CHUNK_ELEMS):
            f = _fold(c, geo, qbs)
            qc, gc = f.q.to(acc), g_all[c.batch, c.heads, qbs].to(acc)
            capped = [soft_cap((qc @ p.k.to(acc).transpose(-1, -2)) * scale, softcap) for p in f.parts]
            scores = [c_s + p.mask.to(acc) for c_s, p in zip(capped, f.parts)]
            lse = torch.logsumexp(torch.stack([torch.logsumexp(s, dim=-1) for s in scores]), dim=0)[..., None]
            lse = lse.masked_fill(lse == float("-inf"), 0.0)  # rows seeing nothing: p = 0 below
            probs = [torch.exp(s - lse) for s in scores]
            o = sum(pr @ p.v.to(acc) for pr, p in zip(probs, f.parts))
            delta = (gc * o).sum(-1, keepdim=True)
            dq_c = torch.zeros_like(qc)
            for pr, p, c_s in zip(probs, f.parts, capped):
                kc, vc = p.k.to(acc), p.v.to(acc)
                ds = pr * (gc @ vc.transpose(-1, -2) - delta)
                if dm4 is not None and c.mask is not None:  # the mask is added after the cap
                    scatter_mask_grad(dm4, c.mask, c.mask_index, n, f.query_pos, p.key_pos, ds)
                ds = ds * soft_cap_slope(c_s, softcap)
                dq_c += (ds @ kc) * scale
                kpos = p.key_pos.expand(n, -1, -1)
                dk_c.index_put_((rows, kpos), (ds.transpose(-1, -2) @ qc) * scale, accumulate=True)
                dv_c.index_put_((rows, kpos), pr.transpose(-1, -2) @ gc, accumulate=True)
            lo, hi = qbs.start * block_size, min(qbs.stop * block_size, seq_len)
            dq[c.batch, c.heads, lo:hi] = dq_c.flatten(1, 2)[:, : hi - lo]

    dk_out = dk[:, :, :seq_len].unflatten(1, (-1, group)).sum(2)
    dv_out = dv[:, :, :seq_len].unflatten(1, (-1, group)).sum(2)
    return dq.to(q.dtype), dk_out.to(k.dtype), dv_out.to(v.dtype), mask_grad_out(dm4, attn_mask, q)
