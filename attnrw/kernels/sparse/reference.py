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
* with ``topk > 0``: the key blocks chosen for the query's block by
  :func:`attnrw.kernels.sparse.layout.select_blocks` (causal: still only
  ``j <= i``);
* then ``attn_mask`` on top, as in ``F.scaled_dot_product_attention``
  (bool: True = may attend; float: added to the scores). A query that sees
  no key (possible only through the mask) outputs 0.

A window that covers the sequence gives dense attention.

How it is computed (cost O(S·(W + sinks + k·bs))): queries are cut into
blocks of ``bs`` folded into the batch axis of one 4-D SDPA call; each query
block attends to the key blocks its band touches, read as an overlapping
strided *view* of one padded copy of the keys (no gather), plus its top-k
blocks (gathered). Sinks ride along for free: every block row of that padded
copy starts with the ``sinks`` first keys, and a mask lets a query block
count only the copy in the first row of its window. A per-block mask gives
the exact band edges; the user mask is read only at the (query, key) pairs
used, through its broadcast view.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnrw.kernels.sparse.layout import band_reach, cdiv, check_inputs, select_blocks

#: Bytes of block rows (the copy of K and V) one chunk of work may hold; see _chunks.
_CHUNK_BYTES = 16 << 20
#: Elements of one score matrix in the backward, which materialises it (keeps memory bounded).
_BACKWARD_CHUNK_ELEMS = 1 << 24


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


@dataclass
class _Folded:
    """Query blocks folded into the batch axis, with the keys each one attends to.

    ``n = batch * heads``, ``nb`` query blocks of ``bs`` rows, ``L`` key slots per block.
    """

    q: torch.Tensor  # (n, nb, bs, D)
    k: torch.Tensor  # (n, nb, L, D), possibly an overlapping view
    v: torch.Tensor  # (n, nb, L, Dv)
    mask: torch.Tensor  # (1 or n, nb, bs, L): bool (True = attend) or float (additive, -inf = not)
    query_pos: torch.Tensor  # (nb, bs) int64 position of each query row, seq_len for padding rows
    key_pos: torch.Tensor  # (1 or n, nb, L) int64 position of each key slot, seq_len where unused
    has_user_mask: bool


def _blocked_rows(x: torch.Tensor, geo: _Geometry, heads: int) -> torch.Tensor:
    """Copy (batch, kv_heads, S, D) into (batch * heads, rows, row_sinks + bs, D) block rows.

    Row ``r`` holds the sink keys, then key block ``r - before`` (zeros outside
    the sequence). GQA heads are expanded by the same copy.
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
    _, allowed = _window_layout(geo, device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def _gather_rows(rows: torch.Tensor, geo: _Geometry, blocks: torch.Tensor) -> torch.Tensor:
    """Key blocks ``blocks`` (n, nb, kk) of the block rows (n, rows, P, D) -> (n, nb, kk * bs, D)."""
    n = rows.shape[0]
    idx = blocks.clamp(min=0) + geo.before
    picked = rows[torch.arange(n, device=rows.device)[:, None, None], idx, geo.row_sinks :]
    return picked.flatten(2, 3)


def _user_mask_index(
    attn_mask: torch.Tensor, batch: int, heads: int, query_pos: torch.Tensor, key_pos: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Indices into the mask's own 4-D view for every (n, block, row, slot) the fold uses.

    query_pos (nb, bs), key_pos (1 or n, nb, L). Returns (indices, 4-D view of
    the mask); the indices broadcast to (1 or n, nb or 1, bs or 1, L or 1).
    Dimensions where the mask has size 1 are indexed with 0, so the gathered
    values keep them at size 1; nothing S×S is built.
    """
    m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    dev = attn_mask.device
    zero = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=dev)
    n = torch.arange(batch * heads, device=dev).view(-1, 1, 1, 1)
    bi = n // heads if m4.shape[0] > 1 else zero
    hi = n % heads if m4.shape[1] > 1 else zero
    # Padding rows and unused slots point past the sequence: read any real entry, the fold masks them.
    qi = query_pos.clamp(max=m4.shape[2] - 1)[None, :, :, None] if m4.shape[2] > 1 else zero
    ki = key_pos.clamp(max=m4.shape[3] - 1)[:, :, None, :] if m4.shape[3] > 1 else zero
    return (bi, hi, qi, ki), m4


def _per_head(x: torch.Tensor, heads: int, stop: int) -> torch.Tensor:
    """The first ``stop`` rows of (batch, kv_heads, S, D) repeated per query head: (batch * heads, stop, D)."""
    batch, kv_heads, _, dim = x.shape
    rows = x[:, :, None, :stop].expand(batch, kv_heads, heads // kv_heads, stop, dim)
    return rows.reshape(batch * heads, stop, dim)


@dataclass
class _Slots:
    """A run of key slots of every query block: keys, values, positions, and who attends to them."""

    k: torch.Tensor  # (n, nb, L, D)
    v: torch.Tensor  # (n, nb, L, Dv)
    pos: torch.Tensor  # (1 or n, nb, L) key position, seq_len where unused
    allowed: torch.Tensor  # (1 or n, nb, bs, L) bool: the sparsity rule for each (query row, slot)


def _fold(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    geo: _Geometry,
    blocks: torch.Tensor | None,
) -> _Folded:
    """Lay out queries, keys, values and the combined mask for one blocked attention call.

    Key slots per query block: the window (band blocks, with the sink copies),
    then the sinks if they did not fit in the rows, then the top-k blocks.
    Every key a query sees has exactly one allowed slot.
    """
    batch, heads, seq_len, dim = q.shape
    n, nb, bs = batch * heads, geo.num_blocks, geo.block_size
    dev = q.device
    pad = nb * bs - seq_len
    qf = (F.pad(q, (0, 0, 0, pad)) if pad else q).reshape(n, nb, bs, dim)
    query_pos = torch.arange(nb * bs, device=dev).view(nb, bs)
    row_ok = (query_pos < seq_len)[None, :, :, None]

    k_rows, v_rows = _blocked_rows(k, geo, heads), _blocked_rows(v, geo, heads)
    wpos, wallowed = _window_layout(geo, dev)
    parts = [_Slots(_window_view(k_rows, geo), _window_view(v_rows, geo), wpos[None], wallowed[None])]
    if geo.extra_sinks:
        e = geo.extra_sinks
        ks, vs = _per_head(k, heads, e)[:, None], _per_head(v, heads, e)[:, None]
        epos = torch.arange(e, device=dev)
        ok = (row_ok & (epos <= query_pos[:, :, None] if geo.is_causal else row_ok)).expand(1, nb, bs, e)
        parts.append(_Slots(ks.expand(n, nb, e, -1), vs.expand(n, nb, e, -1), epos.expand(1, nb, e), ok))
    if blocks is not None:
        blk = blocks.reshape(n, nb, -1)
        tpos = (blk[..., None] * bs + torch.arange(bs, device=dev)).flatten(2)
        ok = (blk >= 0).repeat_interleave(bs, dim=-1) & (tpos < seq_len)
        # Causal candidates lie strictly before the query block (its own block is always in
        # its band), so every key of a chosen block precedes all its queries: no j <= i test.
        parts.append(
            _Slots(
                _gather_rows(k_rows, geo, blk),
                _gather_rows(v_rows, geo, blk),
                tpos.masked_fill(~ok, seq_len),
                ok[:, :, None, :] & row_ok,
            )
        )

    if len(parts) == 1:
        kf, vf, key_pos, allowed = parts[0].k, parts[0].v, parts[0].pos, parts[0].allowed
    else:
        width = max(p.pos.shape[0] for p in parts)
        kf, vf = torch.cat([p.k for p in parts], 2), torch.cat([p.v for p in parts], 2)
        key_pos = torch.cat([p.pos.expand(width, nb, -1) for p in parts], -1)
        allowed = torch.cat([p.allowed.expand(width, nb, bs, -1) for p in parts], -1)

    mask: torch.Tensor = allowed
    if attn_mask is None and len(parts) == 1:
        mask = _window_bias(geo, dev, q.dtype)[None]
    elif attn_mask is not None:
        idx, m4 = _user_mask_index(attn_mask, batch, heads, query_pos, key_pos)
        user = m4[idx]
        if user.dtype == torch.bool:
            mask = allowed & user
        else:
            mask = user.to(q.dtype).masked_fill(~allowed, float("-inf"))
    return _Folded(qf, kf, vf, mask, query_pos, key_pos, attn_mask is not None)


def _visible_rows(mask: torch.Tensor) -> torch.Tensor:
    """(.., bs, L) combined mask -> (.., bs) bool: the row sees at least one key."""
    return mask.any(-1) if mask.dtype == torch.bool else (mask != float("-inf")).any(-1)


@dataclass
class _Chunk:
    """One batch element and a group of kv heads with their query heads: inputs sliced to (1, h, S, .)."""

    batch: int
    heads: slice  # query heads
    kv_heads: slice
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None  # broadcastable to (1, h, S, S)
    mask_index: tuple[slice, slice]  # where ``mask`` sits in the 4-D view of the whole mask
    blocks: torch.Tensor | None  # (1, h, nb, kk)


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
    m4 = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    for b in range(batch):
        for h0 in range(0, kv_heads, step):
            kvs = slice(h0, min(h0 + step, kv_heads))
            hs = slice(kvs.start * group, kvs.stop * group)
            mask, where = None, (slice(None), slice(None))
            if m4 is not None:
                where = (slice(b, b + 1) if m4.shape[0] > 1 else slice(None), hs if m4.shape[1] > 1 else slice(None))
                mask = m4[where]
            yield _Chunk(
                b, hs, kvs, q[b : b + 1, hs], k[b : b + 1, kvs], v[b : b + 1, kvs], mask, where,
                None if blocks is None else blocks[b : b + 1, hs],
            )  # fmt: skip


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
) -> torch.Tensor:
    """Sinks + sliding window (+ block top-k) attention; see the module docstring for the rule.

    q (batch, heads, S, D), k (batch, kv_heads, S, D), v (batch, kv_heads, S, Dv),
    attn_mask None or broadcastable to (batch, heads, S, S) -> (batch, heads, S, Dv)
    in q's dtype. Raises ``ValueError`` when q_len != kv_len.
    """
    check_inputs(q, k, v, attn_mask, window, sinks, topk, block_size)
    batch, heads, seq_len, _ = q.shape
    geo = _geometry(seq_len, block_size, window, sinks, is_causal)
    blocks = select_blocks(q, k, topk, block_size, window, sinks, is_causal)
    out = q.new_empty((batch, heads, seq_len, v.shape[-1]))
    for c in _chunks(q, k, v, attn_mask, blocks, geo):
        f = _fold(c.q, c.k, c.v, c.mask, geo, c.blocks)
        # One 4-D SDPA call: query blocks are the "heads" axis (5-D inputs take a slow path).
        o = F.scaled_dot_product_attention(f.q, f.k, f.v, attn_mask=f.mask, scale=scale)
        if f.has_user_mask:
            # Backends differ on rows with no key (0 or NaN); the op's contract is 0.
            o = o.masked_fill(~_visible_rows(f.mask)[..., None], 0.0)
        out[c.batch, c.heads] = o.flatten(1, 2)[:, :seq_len]
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
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`sparse_attention_torch` (also used after the Triton forward).

    Recomputes each query block's probabilities over the same key slots as
    the forward (fp32 for half inputs), then scatters key and value
    gradients back to their positions. The top-k choice is treated as a
    constant. Returns (dq, dk, dv, dmask); dmask has ``attn_mask``'s shape
    when ``mask_grad``, else it is empty. Memory is bounded by going through
    the same chunks as the forward, and groups of query blocks within them.
    """
    check_inputs(q, k, v, attn_mask, window, sinks, topk, block_size)
    batch, heads, seq_len, dim = q.shape
    group = heads // k.shape[1]
    geo = _geometry(seq_len, block_size, window, sinks, is_causal)
    blocks = select_blocks(q, k, topk, block_size, window, sinks, is_causal)
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    pad = geo.num_blocks * geo.block_size - seq_len
    g_all = F.pad(grad_out, (0, 0, 0, pad)) if pad else grad_out
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    # One extra key row catches the unused slots (position seq_len), whose gradients are 0.
    dk = torch.zeros(batch, heads, seq_len + 1, dim, dtype=acc, device=q.device)
    dv = torch.zeros(batch, heads, seq_len + 1, v.shape[-1], dtype=acc, device=q.device)
    dm4 = None
    if mask_grad and attn_mask is not None:
        dm4 = torch.zeros((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape), dtype=acc, device=q.device)
    for c in _chunks(q, k, v, attn_mask, blocks, geo):
        f = _fold(c.q, c.k, c.v, c.mask, geo, c.blocks)
        n, nb, bs = f.q.shape[:3]
        g_c = g_all[c.batch, c.heads].reshape(n, nb, bs, -1)
        dq_c = torch.empty(n, nb, bs, dim, dtype=acc, device=q.device)
        dk_c, dv_c = dk[c.batch, c.heads], dv[c.batch, c.heads]  # views: scattered into in place
        idx_all = None
        if dm4 is not None and c.mask is not None:
            idx_all, _ = _user_mask_index(c.mask, 1, n, f.query_pos, f.key_pos)
        step = max(1, _BACKWARD_CHUNK_ELEMS // (n * bs * f.k.shape[2]))
        for b0 in range(0, nb, step):
            sl = slice(b0, min(b0 + step, nb))
            qc, kc, vc, gc = (t[:, sl].to(acc) for t in (f.q, f.k, f.v, g_c))
            mask = f.mask if f.mask.shape[1] == 1 else f.mask[:, sl]
            s = (qc @ kc.transpose(-1, -2)) * scale
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(acc)
            lse = torch.logsumexp(s, dim=-1, keepdim=True)
            p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0))  # rows seeing nothing: p = 0
            dp = gc @ vc.transpose(-1, -2)
            ds = p * (dp - (gc * (p @ vc)).sum(-1, keepdim=True))
            dq_c[:, sl] = (ds @ kc) * scale
            kpos = f.key_pos[:, sl].expand(n, -1, -1)
            rows = torch.arange(n, device=q.device)[:, None, None]
            dk_c.index_put_((rows, kpos), (ds.transpose(-1, -2) @ qc) * scale, accumulate=True)
            dv_c.index_put_((rows, kpos), p.transpose(-1, -2) @ gc, accumulate=True)
            if idx_all is not None and dm4 is not None:
                idx = tuple(t if t.shape[1] == 1 else t[:, sl] for t in idx_all)
                # Sum over the axes the mask broadcasts along, then scatter into its own shape.
                target = torch.broadcast_shapes(*(t.shape for t in idx))
                dims = [d for d in range(4) if target[d] == 1 and ds.shape[d] != 1]
                dsum = ds.sum(dim=dims, keepdim=True) if dims else ds  # sum(dim=[]) would sum all
                dm4[c.mask_index].index_put_(idx, dsum, accumulate=True)
        dq[c.batch, c.heads] = dq_c.flatten(1, 2)[:, :seq_len]

    dk_out = dk[:, :, :seq_len].unflatten(1, (-1, group)).sum(2)
    dv_out = dv[:, :, :seq_len].unflatten(1, (-1, group)).sum(2)
    dmask = q.new_empty(0)
    if dm4 is not None and attn_mask is not None:
        dmask = dm4.reshape(attn_mask.shape).to(attn_mask.dtype)
    return dq.to(q.dtype), dk_out.to(k.dtype), dv_out.to(v.dtype), dmask
