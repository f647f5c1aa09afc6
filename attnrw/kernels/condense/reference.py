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

The backward (an op of its own) recomputes both parts and applies the
gradient formulas by hand, through the pooling too (to keys, values, the
probe's queries and a float mask).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnrw.kernels.attention.reference import reduce_to_shape
from attnrw.kernels.condense.layout import Geometry, check_inputs, query_bounds
from attnrw.kernels.sparse.layout import block_means, cdiv
from attnrw.kernels.sparse.reference import attend_part, Part, user_mask_index

#: Query rows per block of the window part (independent of ``block_size``, which only
#: decides the pooling blocks). Measured on the window's SDPA call alone at S=8192, 8 heads,
#: recent=512, group=16 (CPU time, one thread): 16 rows +14%, 32 best, 64 +6%, 128 +19%.
WINDOW_FOLD = 32
#: Bytes one chunk of (batch, kv heads) may hold in its copies of K and V.
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
def _condensed_allowed(lay: _Layout, device: torch.device) -> torch.Tensor:
    """Which sinks and summaries each query row sees (nb·bs, sinks + ng) bool. Cached."""
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
    return torch.cat([sink_ok, group_ok], dim=1)


@functools.lru_cache(maxsize=16)
def _condensed_bias(lay: _Layout, device: torch.device, dtype: torch.dtype, size_bias: bool) -> torch.Tensor:
    """:func:`_condensed_allowed` as an additive mask (nb·bs, sinks + ng) in ``dtype``.

    With ``size_bias`` the summaries carry ``log(size)`` here already: without
    a user mask the size depends only on the geometry (the last group may be short).
    """
    bias = _bias(_condensed_allowed(lay, device), dtype)
    if size_bias and lay.geo.num_groups:
        geo = lay.geo
        sizes = (geo.seq_len - geo.sinks - torch.arange(geo.num_groups, device=device) * geo.group).clamp(max=geo.group)
        bias[:, geo.num_sinks :] += sizes.to(dtype).log()
    return bias


@functools.lru_cache(maxsize=16)
def _rows_seeing(lay: _Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which query rows see some key of the window part (nw·fold,) and of the condensed part (nb·bs,), no user mask."""
    return _window_layout(lay, device)[1].any(-1).flatten(), _condensed_allowed(lay, device).any(-1)


@functools.lru_cache(maxsize=16)
def _condensed_reach(lay: _Layout) -> tuple[int, ...]:
    """Per query block, the length of the prefix of condensed slots its queries see (sinks, then groups)."""
    geo = lay.geo
    _, _, glo, ghi = query_bounds(geo, torch.device("cpu"))
    pad = lay.num_blocks * lay.block_size - geo.seq_len
    glo = F.pad(glo, (0, pad), value=0).view(lay.num_blocks, -1).amax(1)
    ghi = F.pad(ghi, (0, pad), value=geo.num_groups - 1).view(lay.num_blocks, -1).amin(1)
    # Visible groups are g < glo or g > ghi: the last one is ng - 1 if some query has ghi < ng - 1.
    groups = torch.where(ghi < geo.num_groups - 1, geo.num_groups, glo)
    return tuple(int(x) + geo.num_sinks for x in groups)


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
    The pooling runs group-major ((heads, ng, nq, G): the weighted sums are
    then one batched matmul with contiguous batches); ``k``, ``v`` and
    ``bias`` are transposed views in table order.
    """

    k: torch.Tensor  # (hk, nq, ng, D) acc dtype
    v: torch.Tensor  # (hk, nq, ng, Dv)
    bias: torch.Tensor  # (1 or ha, 1 or nq, ng) fp32 summary bias, -inf = not seen
    w: torch.Tensor  # (1 or hk, ng, nq, G) pooling weights
    a: torch.Tensor  # (1 or ha, ng, 1 or nq, G) member values (-inf = not a member)
    kg: torch.Tensor  # (hk, ng, G, D) the grouped keys (zero-padded)
    vg: torch.Tensor  # (hk, ng, G, Dv)
    probe: torch.Tensor | None  # (hk, nb, D), query pooling only


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


def _member_values(m3: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
    """:func:`mask_values` with the key axis broadcast to ``seq_len``: (hm, nq, S)."""
    values = mask_values(m3, block_size, seq_len)
    return values.expand(-1, -1, seq_len) if values.shape[-1] == 1 else values


#: Mask rows reduced to groups at a time by row_groups (bounds its temporaries).
_ROW_GROUPS_ELEMS = 1 << 22


def row_groups(m3: torch.Tensor, geo: Geometry) -> torch.Tensor | None:
    """Which groups each query's own mask row allows some key of: (hm, S, 1 or ng) bool, or None.

    None when the mask does not vary along the queries (then a group with
    no allowed key has no members, which hides its summary already). Reads
    the mask once, ``_ROW_GROUPS_ELEMS`` entries at a time.
    """
    hm, mq, mk = m3.shape
    if mq == 1:
        return None
    allowed = m3 if m3.dtype == torch.bool else m3 > float("-inf")
    if mk == 1:
        return allowed
    ns, ng, size = geo.num_sinks, geo.num_groups, geo.group
    out = torch.empty(hm, mq, ng, dtype=torch.bool, device=m3.device)
    step = max(1, _ROW_GROUPS_ELEMS // max(1, hm * mk))
    for r0 in range(0, mq, step):
        part = F.pad(allowed[:, r0 : r0 + step, ns:], (0, ng * size - (mk - ns)))
        out[:, r0 : r0 + step] = part.unflatten(-1, (ng, size)).any(-1)
    return out


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
    groups: int,
) -> _Pooled:
    """Summaries of the first ``groups`` groups: kx (hk, S, D), vx (hk, S, Dv) in the accumulation dtype.

    ``a``: None, or member values (1 or ha, 1 or nq, S) fp32 from :func:`mask_values`.
    ``probe``: None (mean pooling) or (hk, nq, D) block means of the queries.
    """
    hk, seq, dim = kx.shape
    ns, ng, size = geo.num_sinks, groups, geo.group
    n = ng * size
    valid = min(n, seq - ns)
    tail = n - valid
    kg = F.pad(kx[:, ns : ns + valid], (0, 0, 0, tail)).view(hk, ng, size, dim)
    vg = F.pad(vx[:, ns : ns + valid], (0, 0, 0, tail)).view(hk, ng, size, vx.shape[-1])
    if a is None:
        a_g = _bias(torch.arange(n, device=kx.device) < valid, torch.float32).view(1, ng, 1, size)
    else:
        a_g = F.pad(a[..., ns : ns + valid], (0, tail), value=float("-inf"))
        a_g = a_g.view(a.shape[0], a.shape[1], ng, size).transpose(1, 2)
    z = a_g
    if probe is not None:
        scores = (probe.to(kg.dtype) @ kg.view(hk, n, dim).transpose(-1, -2)) * scale  # (hk, nq, n)
        z = z + scores.view(hk, probe.shape[1], ng, size).transpose(1, 2)
    z = z.contiguous()  # (·, ng, nq, G): the weighted sums below are one matmul with contiguous batches
    top = z.amax(-1, keepdim=True)
    e = torch.exp(z - top.masked_fill(top == float("-inf"), 0.0))
    den = e.sum(-1, keepdim=True)
    w = e / den.masked_fill(den == 0, 1.0)  # groups without members: all-zero weights
    wk = w.to(kg.dtype)
    pooled_k = (wk @ kg).transpose(1, 2)  # (hk, ng, nq, D) -> (hk, nq, ng, D)
    pooled_v = (wk @ vg).transpose(1, 2)
    bias = torch.logsumexp(a_g, -1) if size_bias else a_g.amax(-1)
    return _Pooled(pooled_k, pooled_v, bias.transpose(1, 2), w, a_g, kg, vg, probe)


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
    probe (hk, nb, D) or None, and of the member values ((1 or ha, 1 or nq,
    valid), like the ``a`` given to :func:`_pool`) or None.
    """
    hk, ng, size, dim = p.kg.shape
    n = ng * size
    dks, dvs = dks.transpose(1, 2), dvs.transpose(1, 2)  # (hk, ng, nq, ·)
    wt = p.w.to(dks.dtype).transpose(-1, -2)  # (·, ng, G, nq)
    dkg = wt @ dks  # (hk, ng, G, D)
    dvg = wt @ dvs
    dw = (dks @ p.kg.transpose(-1, -2) + dvs @ p.vg.transpose(-1, -2)).to(p.w.dtype)  # (hk, ng, nq, G)
    dz = p.w * (dw - (p.w * dw).sum(-1, keepdim=True))  # softmax backward
    dprobe = None
    if p.probe is not None:
        flat = dz.transpose(1, 2).reshape(hk, -1, n).to(p.kg.dtype)  # (hk, nq, n)
        dprobe = (flat @ p.kg.reshape(hk, n, dim)) * scale
        dkg = dkg + ((flat.transpose(-1, -2) @ p.probe.to(flat.dtype)) * scale).view(hk, ng, size, dim).to(dkg.dtype)
    da = None
    if dbias is not None:
        if size_bias:  # d logsumexp = softmax
            top = torch.logsumexp(p.a, -1, keepdim=True)
            share = torch.exp(p.a - top.masked_fill(top == float("-inf"), 0.0))
        else:  # d max: split evenly among ties, as torch.amax does
            hit = (p.a == p.a.amax(-1, keepdim=True)).float()
            share = hit / hit.sum(-1, keepdim=True)
        db = reduce_to_shape(dbias.transpose(1, 2), p.a.shape[:-1])
        da_g = reduce_to_shape(dz.float(), p.a.shape) + share * db[..., None]
        da_g = da_g.masked_fill(p.a == float("-inf"), 0.0)  # (·, ng, nq, G)
        da = da_g.transpose(1, 2).reshape(p.a.shape[0], p.a.shape[2], n)[..., :valid]
    return dkg.reshape(hk, n, dim)[:, :valid], dvg.reshape(hk, n, dvg.shape[-1])[:, :valid], dprobe, da


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
    row_groups: torch.Tensor | None  # row_groups of ``mask`` (1 or h, nb·bs, 1 or ng) additive, or None


def _chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, lay: _Layout
) -> Iterator[_Chunk]:
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
    m4 = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
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
                    values = _member_values(mask[0], lay.block_size, seq)
                    rows = row_groups(mask[0], lay.geo)
                    if rows is not None:
                        pad = lay.num_blocks * lay.block_size - seq
                        rows = _bias(F.pad(rows, (0, 0, 0, pad)), q.dtype)
                    if m4.shape[1] == 1:
                        shared = values, rows
                else:
                    values, rows = shared
            yield _Chunk(b, hs, kvs, q[b, hs], k[b, kvs], v[b, kvs], mask, where, values, rows)


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
    idx, m4 = user_mask_index(c.mask, heads, query_pos, key_pos)
    user = m4[idx]
    if user.dtype == torch.bool:
        return torch.where(user, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))
    return bias + user.to(bias.dtype)


def _scatter_mask_grad(
    dm4: torch.Tensor, c: _Chunk, heads: int, query_pos: torch.Tensor, key_pos: torch.Tensor, ds: torch.Tensor
) -> None:
    """Add ds (n, nb, rows, L) into the mask gradient at the (query, key) pairs the slots read."""
    idx, _ = user_mask_index(c.mask, heads, query_pos, key_pos)
    # Sum over the axes the mask broadcasts along, then scatter into its own shape.
    target = torch.broadcast_shapes(*(t.shape for t in idx))
    dims = [d for d in range(4) if target[d] == 1 and ds.shape[d] != 1]
    dsum = ds.sum(dim=dims, keepdim=True) if dims else ds  # sum(dim=[]) would sum all
    dm4[c.mask_index].index_put_(idx, dsum.to(dm4.dtype), accumulate=True)


@dataclass
class _Range:
    """Query rows of one SDPA call and the slots they attend to."""

    rows: slice  # rows of the blocked queries (block-major)
    blocks: slice  # the range's query blocks of ``block_size`` (condensed part)
    q: torch.Tensor  # (h, n_blocks or 1, rows per block, D)
    query_pos: torch.Tensor  # (n_blocks or 1, rows per block)
    part: Part
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
        part = Part(kw[:, r], vw[:, r], mask, key_pos)
        yield _Range(slice(r.start * fold, r.stop * fold), slice(0, 1), qw[:, r], qpos[r], part, length)


@dataclass
class _Sources:
    """What the summaries of one chunk are pooled from."""

    k: torch.Tensor  # (hk, S, D) acc dtype: query heads when the pooling depends on them, else kv heads
    v: torch.Tensor  # (hk, S, Dv)
    values: torch.Tensor | None  # member values (1 or hk, 1 or nb, S) fp32, None without a mask
    probe: torch.Tensor | None  # (hk, nb, D), query pooling only

    @property
    def per_block(self) -> bool:
        """Summaries differ between query blocks: pooled per range of blocks, as they are needed."""
        return self.probe is not None or (self.values is not None and self.values.shape[1] > 1)


def _sources(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, values: torch.Tensor | None, pooling: str, block_size: int) -> _Sources:
    """q (h, S, D), k (kv_h, S, D), v (kv_h, S, Dv) of one batch element.

    Pools per query head only when something depends on it (query pooling,
    or mask values with a head axis), else per kv head.
    """
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    kx, vx = k.to(acc), v.to(acc)
    if pooling == "query" or (values is not None and values.shape[0] > 1):
        kx, vx = _per_head(kx, q.shape[0]), _per_head(vx, q.shape[0])
    probe = block_means(q[None], block_size)[0].to(acc) if pooling == "query" else None
    return _Sources(kx, vx, values, probe)


def _pool_blocks(src: _Sources, blocks: slice | None, groups: int, geo: Geometry, scale: float, size_bias: bool) -> _Pooled:
    """Summaries of the first ``groups`` groups for query blocks ``blocks`` (None: all; for per-block sources)."""
    values, probe = src.values, src.probe
    if blocks is not None:
        values = values[:, blocks] if values is not None and values.shape[1] > 1 else values
        probe = probe[:, blocks] if probe is not None else None
    return _pool(src.k, src.v, values, probe, geo, scale, size_bias, groups)


@dataclass
class _Tables:
    """The condensed part's keys: sinks then summaries, per query head."""

    k: torch.Tensor  # (h, nq, sinks + groups, D) in q's dtype
    v: torch.Tensor  # (h, nq, sinks + groups, Dv)
    bias: torch.Tensor  # (1 or h, 1 or nq, 1, sinks + groups) in q's dtype (0 on the sinks)
    pooled: _Pooled | None  # None: no groups (only sinks)


def _tables(src: _Sources, pooled: _Pooled | None, nq: int, ns: int, heads: int, dtype: torch.dtype) -> _Tables:
    """Put the sinks in front of the summaries, in q's dtype, one table per query head."""
    sink_k = src.k[:, None, :ns].expand(-1, nq, -1, -1)
    sink_v = src.v[:, None, :ns].expand(-1, nq, -1, -1)
    if pooled is None:
        zero = torch.zeros(1, 1, 1, ns, dtype=dtype, device=src.k.device)
        return _Tables(_per_head(sink_k.to(dtype), heads), _per_head(sink_v.to(dtype), heads), zero, None)
    k_t = _per_head(torch.cat([sink_k, pooled.k], dim=2).to(dtype), heads)
    v_t = _per_head(torch.cat([sink_v, pooled.v], dim=2).to(dtype), heads)
    b = pooled.bias
    bias = torch.cat([b.new_zeros(*b.shape[:-1], ns), b], dim=-1)[:, :, None].to(dtype)
    return _Tables(k_t, v_t, bias, pooled)


def _condensed_ranges(
    c: _Chunk, lay: _Layout, src: _Sources, scale: float, size_bias: bool, budget: int
) -> Iterator[tuple[_Range, _Tables]]:
    """The condensed part of a chunk by ranges of query blocks, with the tables each range reads.

    A range reads the slots its blocks see (causal: a prefix that grows
    along the sequence). Per-block summaries are pooled range by range,
    only for the groups the range sees; shared ones once for the chunk.
    """
    heads, bs, nb, dtype = c.q.shape[0], lay.block_size, lay.num_blocks, c.q.dtype
    geo = lay.geo
    ns = geo.num_sinks
    qb = _blocked(c.q, bs)
    # With a user mask the summaries' bias (size included) comes from the tables, per batch and head.
    geo_bias = _condensed_bias(lay, c.q.device, dtype, size_bias and c.values is None).view(nb, bs, -1)
    reach = _condensed_reach(lay)
    qpos = torch.arange(nb * bs, device=c.q.device).view(nb, bs)
    shared = None
    if not src.per_block:
        pooled = _pool_blocks(src, None, geo.num_groups, geo, scale, size_bias) if geo.num_groups else None
        shared = _tables(src, pooled, 1, ns, heads, dtype)
    per = bs * lay.num_slots * (heads if (c.mask is not None or c.values is not None) else 1)
    per += 2 * heads * bs * c.v.shape[-1]
    if src.per_block:  # the block's tables and pooling weights
        per += heads * (lay.num_slots * (c.k.shape[-1] + c.v.shape[-1]) + 3 * lay.seq_len)
    # Causal: a range reads the slots its last block sees; short ranges waste little.
    cap = max(1, 512 // bs) if geo.is_causal else None
    for r in _ranges(nb, per, budget, cap):
        slots = max(reach[r])
        if slots == 0:
            continue
        n = r.stop - r.start
        per_block = src.per_block
        if per_block:
            pooled = _pool_blocks(src, r, slots - ns, geo, scale, size_bias) if slots > ns else None
            t = _tables(src, pooled, n, ns, heads, dtype)
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
            sink = _add_user_mask(mask[..., :ns], c, heads, query_pos, key_pos[..., :ns])
            if sink.shape[0] != mask.shape[0]:
                mask = mask.expand(sink.shape[0], -1, -1, -1).clone()
            mask[..., :ns] = sink
        part = Part(t.k[:, tk, :slots], t.v[:, tk, :slots], mask, key_pos)
        yield _Range(slice(r.start * bs, r.stop * bs), r, q, query_pos, part, slots), t


# ----------------------------------------------------------------------------- forward and backward


def _layout(q: torch.Tensor, recent: int, group: int, sinks: int, is_causal: bool, block_size: int) -> _Layout:
    geo = Geometry(q.shape[-2], recent, group, sinks, bool(is_causal))
    return _Layout(geo, block_size, WINDOW_FOLD)


def _attend_math(q: torch.Tensor, part: Part, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out (fp32 for half inputs): for value dims other than the key dim,
    which PyTorch's fused CPU kernel does not take. Rows that see nothing give 0 and logsumexp -inf."""
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = (q.to(acc) @ part.k.to(acc).transpose(-1, -2)) * scale + part.mask.to(acc)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return (p @ part.v.to(acc)).to(q.dtype), lse.float()


def attend_range(
    rg: _Range, c: _Chunk, scale: float, need_lse: bool, seeing: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA over one range; rows that see nothing give 0 (logsumexp -inf).

    Without a user mask those rows are known from the geometry (``seeing``,
    per blocked row), which spares a pass over the mask to find them.
    """
    if rg.q.shape[-1] != rg.part.v.shape[-1]:
        return _attend_math(rg.q, rg.part, scale)
    if c.mask is not None:
        return attend_part(rg.q, rg.part, scale, need_lse=need_lse, may_be_empty=True)
    o, m = attend_part(rg.q, rg.part, scale, need_lse=need_lse, may_be_empty=False)
    vis = seeing[rg.rows].view(rg.q.shape[1:3])
    if not bool(vis.all()):
        o = o.masked_fill(~vis[..., None], 0.0)
        m = None if m is None else m.masked_fill(~vis, float("-inf"))
    return o, m


def _chunk_parts(
    c: _Chunk, lay: _Layout, scale: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Window part of one chunk: (out (h, nw·fold, Dv), logsumexp (h, nw·fold) fp32 or None)."""
    heads = c.q.shape[0]
    rows = lay.num_windows * lay.fold
    out = c.q.new_empty(heads, rows, c.v.shape[-1])
    lse = torch.empty(heads, rows, dtype=torch.float32, device=c.q.device) if need_lse else None
    seeing = _rows_seeing(lay, c.q.device)[0]
    for rg in _window_ranges(c, lay, _RANGE_ELEMS):
        o, m = attend_range(rg, c, scale, need_lse, seeing)
        out[:, rg.rows] = o.flatten(1, 2)
        if lse is not None:
            lse[:, rg.rows] = m.flatten(1, 2)
    return out, lse


def _condensed_part(
    c: _Chunk, lay: _Layout, src: _Sources, scale: float, size_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Condensed part of one chunk: (out (h, nb·bs, Dv), logsumexp (h, nb·bs) fp32; -inf where nothing is seen)."""
    heads = c.q.shape[0]
    rows = lay.num_blocks * lay.block_size
    out = c.q.new_zeros(heads, rows, c.v.shape[-1])
    lse = torch.full((heads, rows), float("-inf"), dtype=torch.float32, device=c.q.device)
    seeing = _rows_seeing(lay, c.q.device)[1]
    for rg, _ in _condensed_ranges(c, lay, src, scale, size_bias, _RANGE_ELEMS):
        o, m = attend_range(rg, c, scale, True, seeing)
        out[:, rg.rows] = o.flatten(1, 2)
        lse[:, rg.rows] = m.flatten(1, 2)
    return out, lse


def _merge_into(
    ow: torch.Tensor, lw: torch.Tensor, oc: torch.Tensor, lc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two parts' attention outputs by their log-sum-exps -> (out, logsumexp).

    ow, oc (h, S, Dv); lw, lc (h, S) fp32. Rows that see nothing in either
    part give 0. fp32/fp64 outputs are merged into ``ow`` in place (no
    temporaries the size of the output); half ones in fp32.
    """
    lse = torch.logaddexp(lw, lc)
    safe = lse.masked_fill(lse == float("-inf"), 0.0)
    a, b = torch.exp(lw - safe)[..., None], torch.exp(lc - safe)[..., None]
    if ow.dtype in (torch.float32, torch.float64):
        return ow.mul_(a.to(ow.dtype)).addcmul_(oc, b.to(ow.dtype)), lse
    return ow.float() * a + oc.float() * b, lse


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
    out = q.new_empty(batch, seq, heads, v.shape[-1]).transpose(1, 2)
    if seq == 0 or batch * heads == 0:
        return out
    lay = _layout(q, recent, group, sinks, is_causal, block_size)
    two = has_condensed_part(lay)
    for c in _chunks(q, k, v, attn_mask, lay):
        ow, lw = _chunk_parts(c, lay, scale, need_lse=two)
        if not two:
            out[c.batch, c.heads] = ow[:, :seq]
            continue
        src = _sources(c.q, c.k, c.v, c.values, pooling, block_size)
        oc, lc = _condensed_part(c, lay, src, scale, size_bias)
        out[c.batch, c.heads] = _merge_into(ow[:, :seq], lw[:, :seq], oc[:, :seq], lc[:, :seq])[0]
    return out


def _slot_grads(
    rg: _Range, g: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, scale: float, acc: torch.dtype
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
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
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
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _mask_out(dm4, attn_mask, q)
    lay = _layout(q, recent, group, sinks, is_causal, block_size)
    two = has_condensed_part(lay)
    for c in _chunks(q, k, v, attn_mask, lay):
        ow, lw = _chunk_parts(c, lay, scale, need_lse=True)
        ow, lw = ow[:, :seq].to(acc), lw[:, :seq]
        src = None
        if two:
            src = _sources(c.q, c.k, c.v, c.values, pooling, block_size)
            oc, lc = _condensed_part(c, lay, src, scale, size_bias)
            o, lse = _merge_into(ow, lw, oc[:, :seq], lc[:, :seq])
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
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _mask_out(dm4, attn_mask, q)


@dataclass
class _ChunkGrads:
    """Where one chunk's gradients go (views into the call's accumulators)."""

    c: _Chunk
    dq: torch.Tensor  # (h, S, D)
    dk: torch.Tensor  # (h, S + 1, D) per query head; row S catches slots without a key
    dv: torch.Tensor  # (h, S + 1, Dv)
    dk_kv: torch.Tensor  # (batch, kv_heads, S, D): for summaries pooled per kv head
    dv_kv: torch.Tensor
    dm4: torch.Tensor | None  # the mask's gradient (4-D), when asked for


def _blocked_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(h, S) or (h, S, d) -> (h, nb, size) or (h, nb, size, d), zero-padded."""
    return _blocked(x[..., None], size)[..., 0] if x.dim() == 2 else _blocked(x, size)


def _window_backward(
    c: _Chunk, lay: _Layout, g: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, scale: float, acc: torch.dtype, out: _ChunkGrads
) -> None:
    h, seq, fold = c.q.shape[0], lay.seq_len, lay.fold
    heads_idx = torch.arange(h, device=c.q.device)[:, None, None]
    g_w, l_w, d_w = _blocked_rows(g, fold), _blocked_rows(lse, fold), _blocked_rows(delta, fold)
    for rg in _window_ranges(c, lay, _BACKWARD_RANGE_ELEMS):
        wr = slice(rg.rows.start // fold, rg.rows.stop // fold)
        ds, dq_r, dk_r, dv_r = _slot_grads(rg, g_w[:, wr], l_w[:, wr], d_w[:, wr], scale, acc)
        lo, hi = rg.rows.start, min(rg.rows.stop, seq)
        out.dq[:, lo:hi] += dq_r.flatten(1, 2)[:, : hi - lo]
        kpos = rg.part.key_pos.expand(h, -1, -1)
        out.dk.index_put_((heads_idx, kpos), dk_r, accumulate=True)
        out.dv.index_put_((heads_idx, kpos), dv_r, accumulate=True)
        if out.dm4 is not None and c.mask is not None:
            _scatter_mask_grad(out.dm4, c, h, rg.query_pos, rg.part.key_pos, ds)


def _condensed_backward(
    c: _Chunk,
    lay: _Layout,
    src: _Sources,
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
    for rg, t in _condensed_ranges(c, lay, src, scale, size_bias, _BACKWARD_RANGE_ELEMS):
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
            _scatter_mask_grad(out.dm4, c, h, rg.query_pos, rg.part.key_pos[..., :ns], ds[..., :ns])
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
        out.dm4[c.mask_index][0] += reduce_to_shape(_mask_values_backward(da, m3, raw, bs), m3.shape).to(out.dm4.dtype)


def _summary_backward(
    c: _Chunk,
    p: _Pooled,
    dks: torch.Tensor,
    dvs: torch.Tensor,
    dbs: torch.Tensor,
    blocks: slice | None,
    src: _Sources,
    lay: _Layout,
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
    dkx, dvx, dprobe, da = _pool_backward(p, dks, dvs, dbias, scale, size_bias, valid)
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


def _mask_out(dm4: torch.Tensor | None, attn_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if dm4 is None or attn_mask is None:
        return q.new_empty(0)
    return dm4.reshape(attn_mask.shape).to(attn_mask.dtype)


def summary_tables(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    geo: Geometry,
    scale: float,
    pooling: str,
    size_bias: bool,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All summaries of a call at once, for kernels that read them from memory (the Triton path).

    Returns keys (batch, hk, nq, ng, D) and values (batch, hk, nq, ng, Dv)
    in q's dtype and the bias (batch, 1 or hk, 1 or nq, ng) fp32 (-inf = not
    seen). ``hk`` is ``heads`` when the pooling depends on the query head
    (query pooling, or a mask with a head axis), else ``kv_heads``; ``nq``
    is the number of query blocks when it depends on the query block, else 1.
    """
    m4 = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    ks, vs, biases = [], [], []
    for b in range(q.shape[0]):
        values = None if m4 is None else _member_values(m4[b if m4.shape[0] > 1 else 0], block_size, geo.seq_len)
        p = _pool_blocks(_sources(q[b], k[b], v[b], values, pooling, block_size), None, geo.num_groups, geo, scale, size_bias)
        ks.append(p.k.to(q.dtype))
        vs.append(p.v.to(q.dtype))
        biases.append(p.bias.float())
    return torch.stack(ks), torch.stack(vs), torch.stack(biases)
