"""The summaries of ``attnrw::condensed_attention``: pooling of each group's keys and values, and its backward.

The rule (member values ``a_j`` from the mask, pooling weights, the
summary's bias) is in :mod:`attnrw.kernels.condense.reference`. Both paths
pool here: the PyTorch path range by range (:func:`pool_blocks`), the
Triton path all at once on the host (:func:`summary_tables`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnrw.kernels.common.shapes import acc_dtype, additive, as_4d, block_means, cdiv, per_head, reduce_to_shape
from attnrw.kernels.condense.layout import Geometry


@dataclass
class Pooled:
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
        return additive(m3, torch.float32)
    return m3.float()


def member_values(m3: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
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


def mask_values_backward(da: torch.Tensor, m3: torch.Tensor, a: torch.Tensor, block_size: int) -> torch.Tensor:
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


def pool(
    kx: torch.Tensor,
    vx: torch.Tensor,
    a: torch.Tensor | None,
    probe: torch.Tensor | None,
    geo: Geometry,
    scale: float,
    size_bias: bool,
    groups: int,
) -> Pooled:
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
        a_g = additive(torch.arange(n, device=kx.device) < valid, torch.float32).view(1, ng, 1, size)
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
    return Pooled(pooled_k, pooled_v, bias.transpose(1, 2), w, a_g, kg, vg, probe)


def pool_backward(
    p: Pooled,
    dks: torch.Tensor,
    dvs: torch.Tensor,
    dbias: torch.Tensor | None,
    scale: float,
    size_bias: bool,
    valid: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`pool`.

    dks (hk, nq, ng, D), dvs (hk, nq, ng, Dv) in the accumulation dtype;
    ``dbias`` like ``p.bias``, or None when the mask takes no gradient.
    ``valid``: keys after the sinks (the groups are zero-padded past them).
    Returns the gradients of those keys and values (hk, valid, ·), of the
    probe (hk, nb, D) or None, and of the member values ((1 or ha, 1 or nq,
    valid), like the ``a`` given to :func:`pool`) or None.
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


@dataclass
class Sources:
    """What the summaries of one chunk are pooled from."""

    k: torch.Tensor  # (hk, S, D) acc dtype: query heads when the pooling depends on them, else kv heads
    v: torch.Tensor  # (hk, S, Dv)
    values: torch.Tensor | None  # member values (1 or hk, 1 or nb, S) fp32, None without a mask
    probe: torch.Tensor | None  # (hk, nb, D), query pooling only

    @property
    def per_block(self) -> bool:
        """Summaries differ between query blocks: pooled per range of blocks, as they are needed."""
        return self.probe is not None or (self.values is not None and self.values.shape[1] > 1)


def sources(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, values: torch.Tensor | None, pooling: str, block_size: int) -> Sources:
    """q (h, S, D), k (kv_h, S, D), v (kv_h, S, Dv) of one batch element.

    Pools per query head only when something depends on it (query pooling,
    or mask values with a head axis), else per kv head.
    """
    acc = acc_dtype(q.dtype)
    kx, vx = k.to(acc), v.to(acc)
    if pooling == "query" or (values is not None and values.shape[0] > 1):
        kx, vx = per_head(kx, q.shape[0]), per_head(vx, q.shape[0])
    probe = block_means(q[None], block_size)[0].to(acc) if pooling == "query" else None
    return Sources(kx, vx, values, probe)


def pool_blocks(src: Sources, blocks: slice | None, groups: int, geo: Geometry, scale: float, size_bias: bool) -> Pooled:
    """Summaries of the first ``groups`` groups for query blocks ``blocks`` (None: all; for per-block sources)."""
    values, probe = src.values, src.probe
    if blocks is not None:
        values = values[:, blocks] if values is not None and values.shape[1] > 1 else values
        probe = probe[:, blocks] if probe is not None else None
    return pool(src.k, src.v, values, probe, geo, scale, size_bias, groups)


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
    m4 = None if attn_mask is None else as_4d(attn_mask)
    ks, vs, biases = [], [], []
    for b in range(q.shape[0]):
        values = None if m4 is None else member_values(m4[b if m4.shape[0] > 1 else 0], block_size, geo.seq_len)
        p = pool_blocks(sources(q[b], k[b], v[b], values, pooling, block_size), None, geo.num_groups, geo, scale, size_bias)
        ks.append(p.k.to(q.dtype))
        vs.append(p.v.to(q.dtype))
        biases.append(p.bias.float())
    return torch.stack(ks), torch.stack(vs), torch.stack(biases)
