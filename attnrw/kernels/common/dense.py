"""Dense attention in pure PyTorch: the CPU path of ``attnrw::attention``, and what other ops fall back to.

Shapes: ``q`` (batch, heads, q_len, head_dim); ``k`` (batch, kv_heads, kv_len,
head_dim); ``v`` (batch, kv_heads, kv_len, v_dim); ``heads`` a multiple of
``kv_heads`` (grouped-query attention). ``attn_mask`` broadcasts to
(batch, heads, q_len, kv_len): boolean (True = may attend) or additive float,
as in ``F.scaled_dot_product_attention``. ``is_causal`` means what it means
there: query i sees keys j <= i (aligned top-left when q_len != kv_len).
``softcap`` > 0 caps the scaled scores, ``softcap · tanh(s / softcap)``, before
the mask is added (Gemma 2's attention-logit softcapping); 0 leaves them as
they are. SDPA has no such step, so a capped site runs the blocked
computation below (O(block · kv_len) memory per batch and head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnrw.kernels.common.shapes import acc_dtype, expand_kv, reduce_to_shape


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Softmax(cap(q·kᵀ·scale) + mask)·v: PyTorch's fused SDPA, or the blocked path for a softcap."""
    heads = q.shape[1]
    if softcap:
        return _capped_attention(q, k, v, attn_mask, is_causal, scale, softcap)
    # SDPA's enable_gqa takes the math path on the CPU; repeating K/V costs
    # memory of K and V only and keeps the fused kernel.
    k = expand_kv(k, heads)
    v = expand_kv(v, heads)
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    if is_causal and attn_mask is not None:
        attn_mask = _and_causal(attn_mask, q.shape[-2], k.shape[-2])
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def soft_cap(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """``softcap · tanh(s / softcap)``; ``s`` itself for softcap 0."""
    return torch.tanh(s / softcap) * softcap if softcap else s


def soft_cap_slope(capped: torch.Tensor, softcap: float) -> torch.Tensor | float:
    """d cap(s) / ds from the capped scores: ``1 - (capped / softcap)²`` (1 for softcap 0)."""
    return 1.0 - (capped / softcap).square() if softcap else 1.0


def _block_scores(
    qf: torch.Tensor, kf: torch.Tensor, full_mask: torch.Tensor | None, is_causal: bool, scale: float,
    softcap: float, start: int, stop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of queries ``start:stop`` -> (capped and masked, capped before the mask)."""
    capped = soft_cap(qf[..., start:stop, :] @ kf.transpose(-1, -2) * scale, softcap)
    s = capped
    if is_causal:
        rows = torch.arange(start, stop, device=qf.device)[:, None]
        s = s.masked_fill(torch.arange(kf.shape[-2], device=qf.device)[None, :] > rows, float("-inf"))
    if full_mask is not None:
        m = full_mask[..., start:stop, :]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    return s, capped


def _full_mask(attn_mask: torch.Tensor | None, q: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    return attn_mask.expand(*q.shape[:-2], q.shape[-2], kv_len) if attn_mask.dim() == 4 else attn_mask


def _capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
    scale: float, softcap: float, block: int = 512,
) -> torch.Tensor:
    """Dense attention with softcapped scores, one query block at a time (fp32 for half inputs)."""
    heads, q_len = q.shape[1], q.shape[-2]
    acc = acc_dtype(q.dtype)
    qf, kf, vf = (t.to(acc) for t in (q, expand_kv(k, heads), expand_kv(v, heads)))
    full_mask = _full_mask(attn_mask, q, kf.shape[-2])
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        s, _ = _block_scores(qf, kf, full_mask, is_causal, scale, softcap, start, stop)
        out[..., start:stop, :] = (torch.softmax(s, dim=-1).nan_to_num(0.0) @ vf).to(q.dtype)
    return out


def _and_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """Combine a mask with the causal constraint: query i sees keys j <= i (top-left, as SDPA's is_causal)."""
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


def attention_grads(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    softcap: float,
    mask_grad: bool,
    block: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`dense_attention`, recomputing probabilities one query block at a time.

    ``softcap`` as in :func:`dense_attention`. Returns (dq, dk, dv, dmask); dmask has the mask's shape when ``mask_grad``,
    else it is empty. Memory is O(block · kv_len) per (batch, head).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    q_len, kv_len = q.shape[-2], k.shape[-2]
    acc = acc_dtype(q.dtype)
    qf, kf, vf, gf = (t.to(acc) for t in (q, expand_kv(k, heads), expand_kv(v, heads), grad_out))
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    full_mask = _full_mask(attn_mask, q, kv_len)
    dm_full = torch.zeros(*q.shape[:-2], q_len, kv_len, dtype=acc, device=q.device) if mask_grad else None
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        s, capped = _block_scores(qf, kf, full_mask, is_causal, scale, softcap, start, stop)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        g = gf[..., start:stop, :]
        dv += p.transpose(-1, -2) @ g
        dp = g @ vf.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        if dm_full is not None:
            dm_full[..., start:stop, :] = ds
        ds = ds * soft_cap_slope(capped, softcap)  # the mask is added after the cap
        dq[..., start:stop, :] = ds @ kf * scale
        dk += ds.transpose(-1, -2) @ qf[..., start:stop, :] * scale
    if kv_heads != heads:
        group = heads // kv_heads
        dk = dk.unflatten(1, (kv_heads, group)).sum(2)
        dv = dv.unflatten(1, (kv_heads, group)).sum(2)
    dmask = q.new_empty(0)
    if dm_full is not None and attn_mask is not None:
        dmask = reduce_to_shape(dm_full, attn_mask.shape).to(attn_mask.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask
