"""A tiny causal language model with hand-written attention, shared by the examples.

Its attention is written the way many models write it (no SDPA, no
``nn.MultiheadAttention``): ``softmax(Q·Kᵀ·scale + causal mask)·V``.
attnrw finds it from the graph, whatever the code looks like.
"""

from __future__ import annotations

import math

import torch
from torch import nn

VOCAB = 100


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written out by hand."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        y = scores.softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class TinyCausalLM(nn.Module):
    """Embedding, ``layers`` pre-norm blocks of attention and MLP, and a vocabulary head."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim),
                    "attn": CausalSelfAttention(dim, heads),
                    "norm2": nn.LayerNorm(dim),
                    "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
                }
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block["attn"](block["norm1"](x))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(x)


def build(batch: int = 2, seq: int = 64) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A factory for the CLI (``attnrw inspect tiny_model:build``): the model and example inputs."""
    torch.manual_seed(0)
    return TinyCausalLM().eval(), (torch.randint(0, VOCAB, (batch, seq)),)
