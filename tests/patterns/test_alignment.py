"""What a site proves about its axes: aligned sequences from causality, and channel attention told apart.

Sparse and Condense put a window along the key axis by position, so they
need queries and keys to be one sequence, position for position, along the
token axis. A causal site with square scores is aligned by definition (query
i sees keys up to i), whatever tensors q and k came from; channel attention
attends over features, where a window would be a window over channels.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnrw

ATOL = 1e-5
WINDOW, SINKS = 4, 1


class SeparateInputsCausalSDPA(nn.Module):
    """``forward(q, k, v)`` with ``is_causal=True``: q and k share no tensor, only the causal definition."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SeparateInputsCausalEager(nn.Module):
    """The same, hand-written with a ``tril`` buffer as GPT-2 once did."""

    def __init__(self, n: int = 64) -> None:
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(n, n, dtype=torch.bool)))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q.shape[-2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.tril[:s, :s], torch.finfo(scores.dtype).min)
        return scores.softmax(-1) @ v


class SeparateInputsBidirectional(nn.Module):
    """No causal mask: q and k from separate inputs may be any two sequences."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class DaViTChannelAttention(nn.Module):
    """DaViT's channel block: channels attend to channels; the tokens are the contracted axis."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.qkv.weight.mul_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        k = k * self.scale
        attn = (k.transpose(-1, -2) @ v).softmax(dim=-1)  # (B, H, C/H, C/H)
        x = (attn @ q.transpose(-1, -2)).transpose(-1, -2)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def _qkv(s: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(s)
    return tuple(torch.randn(2, 2, s, 8, generator=g) * 2 for _ in range(3))


def _window_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal sinks + window attention, written out as a boolean mask (the oracle)."""
    s = q.shape[-2]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) & ((i - j < WINDOW) | (j < SINKS))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize("module", [SeparateInputsCausalSDPA, SeparateInputsCausalEager])
@pytest.mark.parametrize("way", ["export", "compile"])
def test_causal_site_with_separate_inputs_is_aligned(module: type, way: str) -> None:
    model = module().eval()
    args = _qkv()
    policy = attnrw.Sparse(window=WINDOW, sinks=SINKS)
    if way == "export":
        reports: list[attnrw.Report] = []
        out = attnrw.rewrite(model, args, policy=policy, report=reports).module()(*args)
    else:
        reports = []
        compiled = torch.compile(model, backend=attnrw.backend(policy, on_report=reports.append, inner="eager"))
        with torch.no_grad():
            out = compiled(*args)
    (site,) = reports[0].sites
    assert site.causal and site.self_attention, str(reports[0])
    assert [d.op for d in reports[0].decisions] == ["sparse_attention"]
    torch.testing.assert_close(out, _window_reference(*args), atol=ATOL, rtol=0)


def test_bidirectional_site_with_separate_inputs_is_not_aligned() -> None:
    args = _qkv()
    reports: list[attnrw.Report] = []
    attnrw.rewrite(SeparateInputsBidirectional().eval(), args, policy=attnrw.Sparse(window=WINDOW), report=reports)
    (site,) = reports[0].sites
    assert not site.self_attention
    assert reports[0].decisions[0].op == "attention"
    assert "not one aligned sequence" in reports[0].decisions[0].note


@pytest.mark.parametrize("way", ["export", "compile"])
def test_channel_attention_is_not_self_attention(way: str) -> None:
    torch.manual_seed(0)
    model = DaViTChannelAttention().eval()
    x = torch.randn(2, 12, 32)
    policy = attnrw.Sparse(window=2, sinks=0)
    reports: list[attnrw.Report] = []
    if way == "export":
        out = attnrw.rewrite(model, (x,), policy=policy, report=reports).module()(x)
    else:
        compiled = torch.compile(model, backend=attnrw.backend(policy, on_report=reports.append, inner="eager"))
        with torch.no_grad():
            out = compiled(x)
    (site,) = reports[0].sites
    assert site.attended_axis == "features" and not site.self_attention, str(reports[0])
    assert site.q_len == site.kv_len == 8  # channels per head, not the 12 tokens
    (decision,) = reports[0].decisions
    assert decision.op == "attention" and "channel attention" in decision.note
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=ATOL, rtol=0)


def test_token_attention_reports_the_token_axis() -> None:
    from tests.zoo import ZOO

    model, args, kwargs = ZOO["bert_eager"]()
    sites = attnrw.inspect(model, args, kwargs).sites
    assert [s.attended_axis for s in sites] == ["tokens", "tokens"]
    assert all(s.self_attention for s in sites)
