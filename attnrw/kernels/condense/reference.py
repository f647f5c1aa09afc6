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
  block's queries. Without a mask ``a_j = 0``.

A query that sees nothing (only possible through the mask, or a causal
query among the sinks with ``sinks`` = 0 keys, which cannot happen) outputs 0.

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
  queries attend to them in one SDPA call per range of rows; otherwise once
  per query block, which is folded into the batch axis. A cached mask gives
  which summaries each query sees; causal rows only read the summaries
  their range can see.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnrw.kernels.attention.reference import _reduce_to_shape
from attnrw.kernels.condense.layout import Geometry, check_inputs, query_bounds
from attnrw.kernels.sparse.layout import block_means, cdiv
from attnrw.kernels.sparse.reference import _attend, _merge, _Part, _user_mask_index

#: Query rows per block of the window part (independent of ``block_size``, which only
#: decides the pooling blocks). Measured at S=8192, recent=512, group=16: 32 rows waste
#: the fewest keys at the window's edges and ran fastest (64: +20%, 128: +30%).
WINDOW_FOLD = 32
#: Bytes one chunk of (batch, kv heads) may hold in its copies of K and V and its summary tables.
_CHUNK_BYTES = 32 << 20
#: Elements one SDPA call may materialise (masks, gathered user mask, outputs); see _ranges.
_RANGE_ELEMS = 1 << 22
#: Elements of one score matrix in the backward, which materialises it.
_BACKWARD_RANGE_ELEMS = 1 << 21


@dataclass(frozen=True)
class _Layout:
    """The ints one call's blocking depends on (hashable: the cached masks key on it)."""

    geo: Geometry
    block_size: int
    fold: int

    @property
    def seq_len(self) -> int:
        return self.geo.seq_len

    @property
    def num_blocks(self) -> int:
        """Query blocks of ``block_size`` (the pooling blocks, and the rows of the condensed part)."""
        return cdiv(self.seq_len, self.block_size)

    @property
    def num_windows(self) -> int:
        return cdiv(self.seq_len, self.fold)

    @property
    def full(self) -> bool:
        """The window of every block covers the sequence: read it whole, with no padded copy."""
        before, after = self.geo.reach
        return self.fold + before + after >= self.seq_len

    @property
    def before(self) -> int:
        return 0 if self.full else self.geo.reach[0]

    @property
    def window_len(self) -> int:
        before, after = self.geo.reach
        return self.seq_len if self.full else self.fold + before + after

    @property
    def num_slots(self) -> int:
        """Slots of the condensed part: the sinks, then one per group."""
        return self.geo.num_sinks + self.geo.num_groups


def _blocked(x: torch.Tensor, size: int) -> torch.Tensor:
    """(h, S, D) -> (h, ceil(S / size), size, D), zero-padded (a view when S is a multiple of size)."""
    seq = x.shape[1]
    nb = cdiv(seq, size)
    pad = nb * size - seq
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(1, (nb, size))


# ----------------------------------------------------------------------------- cached geometry masks


@functools.lru_cache(maxsize=16)
def _window_layout(lay: _Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key position of every window slot (nw, L) and which (query, slot) pairs attend (nw, fold, L).

    Slots outside the sequence get position ``seq_len``. Cached (callers must not modify the result).
    """
    seq, fold, nw, length = lay.seq_len, lay.fold, lay.num_windows, lay.window_len
    start = torch.zeros(nw, dtype=torch.long, device=device) if lay.full else torch.arange(nw, device=device) * fold - lay.before
    pos = start[:, None] + torch.arange(length, device=device)[None, :]
    xs, xe, _, _ = query_bounds(lay.geo, device)
    pad = nw * fold - seq
    # Padding rows get an empty interval (xs > xe).
    xs = F.pad(xs, (0, pad), value=seq).view(nw, fold, 1)
    xe = F.pad(xe, (0, pad), value=-1).view(nw, fold, 1)
    allowed = (pos[:, None, :] >= xs) & (pos[:, None, :] <= xe)
    return pos.masked_fill((pos < 0) | (pos >= seq), seq), allowed


@functools.lru_cache(maxsize=16)
def _window_bias(lay: _Layout, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The window's allowed mask as additive 0 / -inf (nw, fold, L) in ``dtype``."""
    return _bias(_window_layout(lay, device)[1], dtype)


@functools.lru_cache(maxsize=16)
def _condensed_bias(lay: _Layout, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Which sinks and summaries each query row sees, additive 0 / -inf (nb·bs, sinks + ng) in ``dtype``."""
    geo = lay.geo
    rows = lay.num_blocks * lay.block_size
    _, _, glo, ghi = query_bounds(geo, device)
    pad = rows - geo.seq_len
    i = torch.arange(rows, device=device)[:, None]
    real = i < geo.seq_len
    j = torch.arange(geo.num_sinks, device=device)[None, :]
    sink_ok = real & ((j <= i) if geo.is_causal else torch.ones_like(j, dtype=torch.bool))
    g = torch.arange(geo.num_groups, device=device)[None, :]
    glo = F.pad(glo, (0, pad))[:, None]
    ghi = F.pad(ghi, (0, pad))[:, None]
    group_ok = real & ((g < glo) | (g > ghi))
    return _bias(torch.cat([sink_ok, group_ok], dim=1), dtype)


@functools.lru_cache(maxsize=16)
def _condensed_reach(lay: _Layout) -> tuple[int, ...]:
    """Per query block, how many slots of the condensed part any of its queries sees (a prefix)."""
    geo = lay.geo
    if not geo.is_causal:
        return (lay.num_slots,) * lay.num_blocks
    _, _, glo, _ = query_bounds(geo, torch.device("cpu"))
    last = torch.arange(lay.num_blocks) * lay.block_size + lay.block_size - 1
    # Causal glo grows with i: the block's last query sees the most groups (and sinks).
    seen = glo[last.clamp(max=geo.seq_len - 1)] + geo.num_sinks
    return tuple(int(x) for x in seen)


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool 'may attend' -> additive 0 / -inf."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def has_condensed_part(lay: _Layout) -> bool:
    """Whether any query sees a sink or a summary (else the window alone is the result)."""
    return max(_condensed_reach(lay), default=0) > 0


# ----------------------------------------------------------------------------- summaries


@dataclass
class _Pooled:
    """Summaries of one chunk, and what their backward needs.

    ``hk`` heads: the chunk's query heads, or its kv heads when nothing in
    the pooling depends on the query head. ``nq``: 1, or the query blocks.
    """

    k: torch.Tensor  # (hk, nq, ng, D) acc dtype
    v: torch.Tensor  # (hk, nq, ng, Dv)
    bias: torch.Tensor  # (1 or ha, 1 or nq, ng) fp32 summary bias, -inf = not seen
    w: torch.Tensor  # (1 or hk, nq, ng, G) pooling weights
    a: torch.Tensor  # (1 or ha, 1 or nq, ng, G) member values (-inf = not a member)
    kg: torch.Tensor  # (hk, ng, G, D) the grouped keys (zero-padded)
    vg: torch.Tensor  # (hk, ng, G, Dv)
    probe: torch.Tensor | None  # (hk, nb, D) fp32, query pooling only


def mask_values(m3: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
    """Reduce one batch element's mask (hm, Mq, Mk) to the summaries' member values (hm, nq, Mk) fp32.

    ``Mq`` and ``Mk`` are 1 or S. Rows of one query block are reduced by
    their max (bool: or), so ``nq`` is the number of query blocks when the
    mask varies along the queries and 1 otherwise. Bool becomes 0 / -inf.
    Reads the mask once, by whole blocks (no copy of it).
    """
    hm, mq, mk = m3.shape
    if mq > 1:
        full = seq_len // block_size
        parts = []
        if full:
            body = m3[:, : full * block_size].unflatten(1, (full, block_size))
            parts.append(body.any(2) if m3.dtype == torch.bool else body.amax(2))
        if full * block_size < seq_len:
            tail = m3[:, full * block_size :]
            parts.append((tail.any(1) if m3.dtype == torch.bool else tail.amax(1))[:, None])
        m3 = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if m3.dtype == torch.bool:
        return _bias(m3, torch.float32)
    return m3.float()


def _mask_values_backward(da: torch.Tensor, m3: torch.Tensor, a: torch.Tensor, block_size: int) -> torch.Tensor:
    """Gradient of :func:`mask_values` (float masks): da (hm, nq, Mk) -> (hm, Mq, Mk).

    The max over a block's rows sends its gradient to the rows that reach
    it, split evenly among ties (as ``torch.amax`` does).
    """
    hm, mq, mk = m3.shape
    if mq == 1:
        return da
    seq = mq
    nb = cdiv(seq, block_size)
    rows_block = (torch.arange(seq, device=m3.device) // block_size)
    hit = (m3.float() == a[:, rows_block]).float()  # (hm, S, Mk)
    pad = nb * block_size - seq
    count = F.pad(hit, (0, 0, 0, pad)).unflatten(1, (nb, block_size)).sum(2)  # (hm, nb, Mk)
    share = da / count.clamp(min=1.0)
    return hit * share[:, rows_block]


def _pool(
    kx: torch.Tensor,
    vx: torch.Tensor,
    a: torch.Tensor | None,
    probe: torch.Tensor | None,
    geo: Geometry,
    scale: float,
    size_bias: bool,
) -> _Pooled:
    """Summaries of the groups: kx (hk, S, D), vx (hk, S, Dv) in the accumulation dtype.

    ``a``: None, or member values (1 or ha, 1 or nq, S) fp32 from :func:`mask_values`.
    ``probe``: None (mean pooling) or (hk, nb, D) fp32 block means of the queries.
    """
    hk, seq, dim = kx.shape
    ns, ng, size = geo.num_sinks, geo.num_groups, geo.group
    n = ng * size
    tail = n - (seq - ns)
    kg = F.pad(kx[:, ns:], (0, 0, 0, tail)).view(hk, ng, size, dim)
    vg = F.pad(vx[:, ns:], (0, 0, 0, tail)).view(hk, ng, size, vx.shape[-1])
    if a is None:
        a_g = _bias(torch.arange(n, device=kx.device) < seq - ns, torch.float32).view(1, 1, ng, size)
    else:
        a_g = F.pad(a[..., ns:], (0, tail), value=float("-inf")).unflatten(-1, (ng, size))
    z = a_g
    if probe is not None:
        scores = (probe @ kg.view(hk, n, dim).to(probe.dtype).transpose(-1, -2)) * scale
        z = z + scores.view(hk, -1, ng, size)
    top = z.amax(-1, keepdim=True)
    e = torch.exp(z - top.masked_fill(top == float("-inf"), 0.0))
    den = e.sum(-1, keepdim=True)
    w = e / den.masked_fill(den == 0, 1.0)  # groups without members: all-zero weights
    wk = w.to(kg.dtype)
    pooled_k = (wk.transpose(1, 2) @ kg).transpose(1, 2)  # (hk, nq, ng, D)
    pooled_v = (wk.transpose(1, 2) @ vg).transpose(1, 2)
    bias = torch.logsumexp(a_g, -1) if size_bias else a_g.amax(-1)
    return _Pooled(pooled_k, pooled_v, bias, w, a_g, kg, vg, probe)


def _pool_backward(
    p: _Pooled,
    dks: torch.Tensor,
    dvs: torch.Tensor,
    dbias: torch.Tensor | None,
    scale: float,
    size_bias: bool,
    valid: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`_pool`.

    dks (hk, nq, ng, D), dvs (hk, nq, ng, Dv) in the accumulation dtype;
    ``dbias`` like ``p.bias``, or None when the mask takes no gradient.
    ``valid``: keys after the sinks (the groups are zero-padded past them).
    Returns the gradients of those keys and values (hk, valid, ·), of the
    probe (hk, nb, D) or None, and of the member values (``p.a``'s leading
    shape, valid) or None.
    """
    hk, ng, size, dim = p.kg.shape
    n = ng * size
    wt = p.w.permute(0, 2, 3, 1).to(dks.dtype)  # (hw, ng, G, nq)
    dkg = wt @ dks.transpose(1, 2)  # (hk, ng, G, D)
    dvg = wt @ dvs.transpose(1, 2)
    dw = (dks.transpose(1, 2) @ p.kg.transpose(-1, -2) + dvs.transpose(1, 2) @ p.vg.transpose(-1, -2)).transpose(1, 2)
    dw = dw.to(p.w.dtype)
    dz = p.w * (dw - (p.w * dw).sum(-1, keepdim=True))  # softmax backward, (hk, nq, ng, G)
    dprobe = None
    if p.probe is not None:
        flat = dz.reshape(hk, -1, n)
        dprobe = (flat @ p.kg.reshape(hk, n, dim).to(flat.dtype)) * scale
        dkg = dkg + ((flat.transpose(-1, -2) @ p.probe) * scale).view(hk, ng, size, dim).to(dkg.dtype)
    da = None
    if dbias is not None:
        if size_bias:  # d logsumexp = softmax
            top = torch.logsumexp(p.a, -1, keepdim=True)
            share = torch.exp(p.a - top.masked_fill(top == float("-inf"), 0.0))
        else:  # d max: split evenly among ties, as torch.amax does
            hit = (p.a == p.a.amax(-1, keepdim=True)).float()
            share = hit / hit.sum(-1, keepdim=True)
        da_g = _reduce_to_shape(dz, p.a.shape) + share * _reduce_to_shape(dbias, p.a.shape[:-1])[..., None]
        da = da_g.masked_fill(p.a == float("-inf"), 0.0).flatten(-2)[..., :valid]
    return dkg.reshape(hk, n, dim)[:, :valid], dvg.reshape(hk, n, -1)[:, :valid], dprobe, da


# ----------------------------------------------------------------------------- chunks and parts


@dataclass
class _Chunk:
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


def _chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, lay: _Layout, per_query: bool
) -> Iterator[_Chunk]:
    """Split the work by batch element and by groups of kv heads (with all their query heads).

    Sized so the padded copies of K and V and the summary tables of a chunk
    stay near ``_CHUNK_BYTES`` (heap-reused from one chunk to the next).
    """
    batch, heads, seq, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    dims = k.shape[-1] + v.shape[-1]
    nq = lay.num_blocks if per_query else 1
    copy = 0 if lay.full else (lay.num_windows * lay.fold + lay.window_len) * dims
    per_kv_head = group * (copy + nq * lay.num_slots * dims + nq * seq) * 4
    step = max(1, _CHUNK_BYTES // max(1, per_kv_head))
    m4 = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    for b in range(batch):
        shared = None  # mask values of a mask without a head axis: one per batch element
        for h0 in range(0, kv_heads, step):
            kvs = slice(h0, min(h0 + step, kv_heads))
            hs = slice(kvs.start * group, kvs.stop * group)
            mask, where, values = None, (slice(None), slice(None)), None
            if m4 is not None:
                where = (slice(b, b + 1) if m4.shape[0] > 1 else slice(None), hs if m4.shape[1] > 1 else slice(None))
                mask = m4[where]
                if m4.shape[1] > 1 or shared is None:
                    values = mask_values(mask[0], lay.block_size, seq)
                    values = values.expand(-1, -1, seq) if values.shape[-1] == 1 else values
                    if m4.shape[1] == 1:
                        shared = values
                else:
                    values = shared
            yield _Chunk(b, hs, kvs, q[b, hs], k[b, kvs], v[b, kvs], mask, where, values)


def _per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(kv_h, ...) -> (heads, ...) with kv head ``c`` repeated for its query heads."""
    kv = x.shape[0]
    if kv == heads:
        return x
    return x[:, None].expand(kv, heads // kv, *x.shape[1:]).reshape(heads, *x.shape[1:])


def _window_keys(x: torch.Tensor, heads: int, lay: _Layout) -> torch.Tensor:
    """(kv_h, S, D) -> (heads, nw, L, D): each window block's keys, an overlapping view of one padded copy."""
    kv, seq, dim = x.shape
    nw, length = lay.num_windows, lay.window_len
    if lay.full:
        return _per_head(x, heads)[:, None].expand(heads, nw, seq, dim)
    total = (nw - 1) * lay.fold + length
    buf = x.new_empty(kv, heads // kv, total, dim)
    buf[:, :, : lay.before].zero_()
    buf[:, :, lay.before : lay.before + seq].copy_(x[:, None])
    buf[:, :, lay.before + seq :].zero_()
    return buf.view(heads, total, dim).unfold(1, length, lay.fold).transpose(-1, -2)


def _add_user_mask(bias: torch.Tensor, c: _Chunk, heads: int, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """The slots' additive mask combined with the user mask read at (query, key) positions."""
    if c.mask is None:
        return bias
    idx, m4 = _user_mask_index(c.mask, heads, query_pos, key_pos)
    user = m4[idx]
    if user.dtype == torch.bool:
        return torch.where(user, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))
    return bias + user.to(bias.dtype)


def _scatter_mask_grad(
    dm4: torch.Tensor, c: _Chunk, heads: int, query_pos: torch.Tensor, key_pos: torch.Tensor, ds: torch.Tensor
) -> None:
    """Add ds (n, nb, rows, L) into the mask gradient at the (query, key) pairs the slots read."""
    idx, _ = _user_mask_index(c.mask, heads, query_pos, key_pos)
    # Sum over the axes the mask broadcasts along, then scatter into its own shape.
    target = torch.broadcast_shapes(*(t.shape for t in idx))
    dims = [d for d in range(4) if target[d] == 1 and ds.shape[d] != 1]
    dsum = ds.sum(dim=dims, keepdim=True) if dims else ds  # sum(dim=[]) would sum all
    dm4[c.mask_index].index_put_(idx, dsum.to(dm4.dtype), accumulate=True)


@dataclass
class _Range:
    """Query rows of one SDPA call and the slots they attend to."""

    rows: slice  # rows of the blocked queries (block-major)
    blocks: slice  # which tables' blocks (condensed part with per-block tables), else slice(0, 1)
    q: torch.Tensor  # (h, n_blocks or 1, rows per block, D)
    query_pos: torch.Tensor  # (n_blocks or 1, rows per block)
    part: _Part
    slots: int


def _ranges(count: int, per: int, budget: int, cap: int | None = None) -> Iterator[slice]:
    step = max(1, budget // max(1, per))
    if cap is not None:
        step = min(step, cap)
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))


def _window_ranges(c: _Chunk, lay: _Layout, budget: int) -> Iterator[_Range]:
    """The window part of a chunk, by ranges of window blocks."""
    heads = c.q.shape[0]
    fold, length = lay.fold, lay.window_len
    qw = _blocked(c.q, fold)
    kw, vw = _window_keys(c.k, heads, lay), _window_keys(c.v, heads, lay)
    pos, _ = _window_layout(lay, c.q.device)
    bias = _window_bias(lay, c.q.device, c.q.dtype)
    qpos = torch.arange(lay.num_windows * fold, device=c.q.device).view(-1, fold)
    per = fold * length * (heads if c.mask is not None else 1) + 2 * heads * fold * c.v.shape[-1]
    for r in _ranges(lay.num_windows, per, budget):
        key_pos = pos[None, r]
        mask = _add_user_mask(bias[None, r], c, heads, qpos[r], key_pos)
        part = _Part(kw[:, r], vw[:, r], mask, key_pos)
        yield _Range(slice(r.start * fold, r.stop * fold), slice(0, 1), qw[:, r], qpos[r], part, length)


@dataclass
class _Tables:
    """The condensed part's keys of a chunk: sinks then summaries, per query head."""

    k: torch.Tensor  # (h, nq, sinks + ng, D) in q's dtype
    v: torch.Tensor  # (h, nq, sinks + ng, Dv)
    bias: torch.Tensor  # (1 or h, 1 or nq, 1, sinks + ng) in q's dtype (0 on the sinks)
    pooled: _Pooled


def _tables(c: _Chunk, lay: _Layout, scale: float, pooling: str, size_bias: bool) -> _Tables:
    heads, dtype = c.q.shape[0], c.q.dtype
    geo = lay.geo
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    per_query_head = pooling == "query" or (c.values is not None and c.values.shape[0] > 1)
    kx, vx = c.k.to(acc), c.v.to(acc)
    if per_query_head:
        kx, vx = _per_head(kx, heads), _per_head(vx, heads)
    probe = block_means(c.q[None], lay.block_size)[0] if pooling == "query" else None
    pooled = _pool(kx, vx, c.values, probe, geo, scale, size_bias)
    nq = pooled.k.shape[1]
    ns = geo.num_sinks
    sink_k = kx[:, None, :ns].expand(-1, nq, -1, -1)
    sink_v = vx[:, None, :ns].expand(-1, nq, -1, -1)
    k_t = _per_head(torch.cat([sink_k, pooled.k], dim=2).to(dtype), heads)
    v_t = _per_head(torch.cat([sink_v, pooled.v], dim=2).to(dtype), heads)
    b = pooled.bias
    bias = torch.cat([b.new_zeros(*b.shape[:-1], ns), b], dim=-1)[:, :, None].to(dtype)
    return _Tables(k_t, v_t, bias, pooled)


def _condensed_ranges(c: _Chunk, lay: _Layout, t: _Tables, budget: int) -> Iterator[_Range]:
    """The condensed part of a chunk, by ranges of query blocks; causal ranges read only the slots they see."""
    heads, bs, nb = c.q.shape[0], lay.block_size, lay.num_blocks
    ns = lay.geo.num_sinks
    qb = _blocked(c.q, bs)
    geo_bias = _condensed_bias(lay, c.q.device, c.q.dtype).view(nb, bs, -1)
    reach = _condensed_reach(lay)
    per_block = t.k.shape[1] > 1
    qpos = torch.arange(nb * bs, device=c.q.device).view(nb, bs)
    per = bs * lay.num_slots * (heads if (c.mask is not None or t.bias.shape[0] > 1) else 1) + 2 * heads * bs * c.v.shape[-1]
    # Causal: a range reads the slots its last block sees; short ranges waste little.
    cap = max(1, 512 // bs) if lay.geo.is_causal else None
    for r in _ranges(nb, per, budget, cap):
        slots = max(reach[r])
        if slots == 0:
            continue
        n = r.stop - r.start
        if per_block:
            q, query_pos, tb = qb[:, r], qpos[r], r
            mask = geo_bias[None, r, :, :slots] + t.bias[:, r, :, :slots]
        else:
            q, query_pos, tb = qb[:, r].reshape(heads, 1, n * bs, -1), qpos[r].reshape(1, n * bs), slice(0, 1)
            mask = geo_bias[r, :, :slots].reshape(1, 1, n * bs, slots) + t.bias[:, :, :, :slots]
        # Slot positions: the sinks' keys, then the summaries (no position: seq_len).
        key_pos = torch.arange(slots, device=c.q.device).masked_fill_(torch.arange(slots, device=c.q.device) >= ns, lay.seq_len)[None, None]
        if c.mask is not None and ns:
            sink = _add_user_mask(mask[..., :ns], c, heads, query_pos, key_pos[..., :ns])
            if sink.shape[0] != mask.shape[0]:
                mask = mask.expand(sink.shape[0], -1, -1, -1).clone()
            mask[..., :ns] = sink
        part = _Part(t.k[:, tb, :slots], t.v[:, tb, :slots], mask, key_pos)
        yield _Range(slice(r.start * bs, r.stop * bs), tb, q, query_pos, part, slots)
