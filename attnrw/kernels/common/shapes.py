"""Small tensor helpers the kernel packages share (pure PyTorch, no loops over elements)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def as_4d(attn_mask: torch.Tensor) -> torch.Tensor:
    """A view of the mask with leading size-1 dims up to 4-D."""
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: fp32 for half inputs, the input's own otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool 'may attend' -> additive 0 / -inf in ``dtype``."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat (batch, kv_heads, len, dim) to (batch, heads, len, dim) for GQA."""
    kv_heads = x.shape[1]
    if kv_heads == heads:
        return x
    return x.repeat_interleave(heads // kv_heads, dim=1)


def per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(kv_h, ...) -> (heads, ...) with kv head ``c`` repeated for its query heads (a view when equal)."""
    kv = x.shape[0]
    if kv == heads:
        return x
    return x[:, None].expand(kv, heads // kv, *x.shape[1:]).reshape(heads, *x.shape[1:])


def blocked(x: torch.Tensor, size: int) -> torch.Tensor:
    """(h, S, D) -> (h, ceil(S / size), size, D), zero-padded (a view when S is a multiple of size)."""
    seq = x.shape[1]
    nb = cdiv(seq, size)
    pad = nb * size - seq
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(1, (nb, size))


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(batch, heads, S, dim) -> (batch, heads, nb, dim): fp32 mean of each block over its real rows."""
    seq_len = x.shape[-2]
    nb = cdiv(seq_len, block_size)
    x = x.float()
    pad = nb * block_size - seq_len
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    sums = x.unflatten(-2, (nb, block_size)).sum(-2)
    counts = (torch.arange(nb, device=x.device) * block_size).neg_().add_(seq_len).clamp_(max=block_size)
    return sums / counts[:, None].to(sums.dtype)


def ranges(count: int, per: int, budget: int, cap: int | None = None) -> Iterator[slice]:
    """Consecutive ranges of ``count`` items, each about ``budget // per`` long (at most ``cap``, at least 1)."""
    step = max(1, budget // max(1, per))
    if cap is not None:
        step = min(step, cap)
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))


def reduce_to_shape(grad: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of the tensor that was broadcast."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad


def mask_grad_out(dm4: torch.Tensor | None, attn_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The mask gradient an op's backward returns: ``dm4`` (the 4-D view's) in the mask's shape and dtype, else empty."""
    if dm4 is None or attn_mask is None:
        return like.new_empty(0)
    return dm4.reshape(attn_mask.shape).to(attn_mask.dtype)
