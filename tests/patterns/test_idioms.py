"""Attention idioms from third-party code the matcher must take: one small module per idiom.

Each module writes attention as its source does and also knows its own
attention in the canonical layout (``canonical``: q, k, v as (B, H, S, D)
and the scale), from which the test builds the reference: dense, or with a
hand-written band for Sparse. Projection weights are multiplied by
``GAIN`` so that the softmax is far from uniform (``test_attention_is_peaked``
checks it): with random init a dropped scale or a swapped axis can hide
under the tolerance.

Every idiom is traced at one length and run at another (``torch.export``
with a dynamic length, ``torch.compile`` called at two lengths).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnrw
from attnrw.kernels.attention import math_attention

#: fp32 exact rewrites (DESIGN.md).
ATOL = 1e-5
#: Projection weights times this make the attention peaked.
GAIN = 4.0
WINDOW = 4


class Idiom(nn.Module):
    """An attention block whose forward is the idiom; ``canonical`` exposes its attention for the reference."""

    #: The sequence length of the example inputs, and another one to run at.
    lengths = (10, 13)

    def example(self, s: int, batch: int = 2) -> torch.Tensor:
        raise NotImplementedError

    def canonical(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError

    def finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output from the canonical attention output (B, H, S, Dv)."""
        raise NotImplementedError

    def reference(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, scale = self.canonical(x)
        return self.finish(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale), x)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _, scale = self.canonical(x)
        return ((q @ k.transpose(-1, -2)) * scale).softmax(-1)

    def dynamic_shapes(self) -> dict:
        return {"x": {1: torch.export.Dim("seq", min=2, max=64)}}


def _gain(*layers: nn.Module) -> None:
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(GAIN)


# -- P as the right operand --------------------------------------------------------


class TimmEfficientVitMsra(Idiom):
    """timm's EfficientViT (MSRA) cascaded group attention: channels-first q, k, v from 1×1 convs.

    ``attn = (q.transpose(-2, -1) @ k) * scale + bias``, ``v @ attn.transpose(-2, -1)``:
    the probabilities are the right operand, transposed, and the output is (B, H, Dv, N).
    """

    lengths = (12, 20)  # 3×4 and 4×5 images

    def __init__(self, c: int = 16, heads: int = 2, d: int = 8) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv = nn.Conv2d(c, heads * 3 * d, 1)
        self.scale = d**-0.5
        _gain(self.qkv)

    def example(self, s: int, batch: int = 2) -> torch.Tensor:
        h = {12: 3, 20: 4}[s]
        return torch.randn(batch, 16, h, s // h)

    def dynamic_shapes(self) -> dict:
        return {"x": {2: torch.export.Dim("h", min=2, max=16), 3: torch.export.Dim("w", min=2, max=16)}}

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = x.shape[0]
        q, k, v = self.qkv(x).view(b, self.heads, 3 * self.d, -1).split([self.d] * 3, dim=2)
        return q, k, v  # (B, H, d, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        attn = (q.transpose(-2, -1) @ k) * self.scale
        attn = attn.softmax(dim=-1)
        out = v @ attn.transpose(-2, -1)
        return out.reshape(x.shape[0], -1, *x.shape[2:])

    def canonical(self, x):
        q, k, v = (t.transpose(-1, -2) for t in self._split(x))
        return q, k, v, self.scale

    def finish(self, out, x):
        return out.transpose(-1, -2).reshape(x.shape[0], -1, *x.shape[2:])


class ChannelsFirstValuesLeft(Idiom):
    """Channels-first values with the probabilities on the left: ``(attn @ v.transpose(-2, -1)).transpose(-2, -1)``."""

    def __init__(self, e: int = 16, heads: int = 2, d: int = 8) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv = nn.Conv1d(e, 3 * heads * d, 1)
        _gain(self.qkv)

    def example(self, s: int, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 16, s)

    def dynamic_shapes(self) -> dict:
        return {"x": {2: torch.export.Dim("seq", min=2, max=64)}}

    def _split(self, x):
        b, _, n = x.shape
        return self.qkv(x).view(b, 3, self.heads, self.d, n).unbind(1)  # (B, H, d, N) each

    def forward(self, x):
        q, k, v = self._split(x)
        attn = (q.transpose(-2, -1) @ k / math.sqrt(self.d)).softmax(-1)
        return (attn @ v.transpose(-2, -1)).transpose(-2, -1).flatten(1, 2)

    def canonical(self, x):
        q, k, v = (t.transpose(-1, -2) for t in self._split(x))
        return q, k, v, 1 / math.sqrt(self.d)

    def finish(self, out, x):
        return out.transpose(-2, -1).flatten(1, 2)


# -- a per-head scale tensor ----------------------------------------------------------


class Swinv2CosineAttention(Idiom):
    """Swin-v2 (HF and torchvision) cosine attention: normalised q and k times ``exp(clamp(logit_scale))``.

    ``logit_scale`` has shape (H, 1, 1): one learned temperature per head, a
    runtime value. Here it starts at log(20) and log(60), so that cosine
    scores in [-1, 1] give a peaked softmax; the position bias is a table
    sliced to the length (Swin's window is fixed, this one need not be).
    """

    def __init__(self, e: int = 16, heads: int = 2, d: int = 8) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv = nn.Linear(e, 3 * heads * d)
        self.logit_scale = nn.Parameter(torch.log(torch.tensor([20.0, 60.0])[:heads]).view(heads, 1, 1))
        self.bias_table = nn.Parameter(torch.randn(heads, 128, 128))

    def example(self, s: int, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, s, 16)

    def _split(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def _scale(self):
        return torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()

    def _bias(self, s: int) -> torch.Tensor:
        return 16 * torch.sigmoid(self.bias_table[:, :s, :s])

    def forward(self, x):
        q, k, v = self._split(x)
        attn = q @ k.transpose(-2, -1)
        attn = attn * self._scale()
        attn = attn + self._bias(x.shape[1]).unsqueeze(0)
        out = attn.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)

    def canonical(self, x):
        q, k, v = self._split(x)
        return q * self._scale(), k, v, 1.0

    def reference(self, x, allowed=None):
        q, k, v, _ = self.canonical(x)
        bias = self._bias(x.shape[1])
        if allowed is not None:
            bias = bias.masked_fill(~allowed, float("-inf"))
        return self.finish(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0), x)

    def probs(self, x):
        q, k, _, _ = self.canonical(x)
        return (q @ k.transpose(-1, -2) + self._bias(x.shape[1])).softmax(-1)

    def finish(self, out, x):
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


class PerHeadTemperature(Idiom):
    """Temperature-scaled attention: masked scores divided by a learned (1, H, 1, 1) temperature.

    The division comes after the padding mask, so the mask is scaled by it too.
    """

    def __init__(self, e: int = 16, heads: int = 2, d: int = 8) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv = nn.Linear(e, 3 * heads * d)
        self.temperature = nn.Parameter(torch.tensor([0.25, 0.6])[:heads].view(1, heads, 1, 1))
        _gain(self.qkv)

    def example(self, s: int, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, s, 16)

    def _split(self, x):
        b, s, _ = x.shape
        return self.qkv(x).view(b, s, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)

    def _pad(self, x) -> torch.Tensor:
        keep = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool)
        keep[-1, -2:] = False
        return keep

    def forward(self, x):
        q, k, v = self._split(x)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d)
        scores = scores.masked_fill(~self._pad(x)[:, None, None, :], torch.finfo(scores.dtype).min)
        scores = scores / self.temperature
        out = scores.softmax(dim=-1) @ v
        return out.transpose(1, 2).flatten(2)

    def canonical(self, x):
        q, k, v = self._split(x)
        return q / self.temperature, k, v, 1 / math.sqrt(self.d)

    def reference(self, x, allowed=None):
        q, k, v, scale = self.canonical(x)
        mask = self._pad(x)[:, None, None, :]
        if allowed is not None:
            mask = mask & allowed
        return self.finish(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), x)

    def finish(self, out, x):
        return out.transpose(1, 2).flatten(2)


# -- softcapped scores ----------------------------------------------------------------


class Gemma2SoftcapScores(Idiom):
    """Gemma 2's attention-logit softcapping, ``tanh(s / cap) * cap`` on the scaled scores, then a padding mask.

    Gemma 2 is causal; here the scores are bidirectional so that the shared
    Sparse test applies (the causal HF model is in ``test_softcap.py``). The
    cap is small against the peaked scores, so dropping it changes the output.
    """

    cap = 4.0

    def __init__(self, e: int = 16, heads: int = 2, d: int = 8) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.q, self.k, self.v = (nn.Linear(e, heads * d) for _ in range(3))
        _gain(self.q, self.k)

    def example(self, s: int, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, s, 16)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.heads, self.d).transpose(1, 2)

    def _pad(self, x) -> torch.Tensor:
        keep = torch.ones(x.shape[0], 1, 1, x.shape[1], dtype=torch.bool)
        keep[-1, ..., -2:] = False  # two padded keys: every query of the band still sees one
        return keep

    def forward(self, x):
        q, k, v = (self._heads(lin(x)) for lin in (self.q, self.k, self.v))
        w = torch.matmul(q, k.transpose(2, 3)) * self.d**-0.5
        w = w / self.cap
        w = torch.tanh(w)
        w = w * self.cap
        w = w + torch.zeros(self._pad(x).shape).masked_fill(~self._pad(x), torch.finfo(w.dtype).min)
        p = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)

    def canonical(self, x):
        q, k, v = (self._heads(lin(x)) for lin in (self.q, self.k, self.v))
        return q, k, v, self.d**-0.5

    def reference(self, x, allowed=None):
        q, k, v, scale = self.canonical(x)
        mask = self._pad(x) if allowed is None else self._pad(x) & allowed
        return self.finish(math_attention(q, k, v, mask, False, scale, self.cap), x)

    def dynamic_shapes(self) -> dict:
        return {"x": {1: torch.export.Dim("seq", min=3, max=64)}}  # two padded keys and one more

    def probs(self, x):
        q, k, _, scale = self.canonical(x)
        return (torch.tanh((q @ k.transpose(-1, -2)) * scale / self.cap) * self.cap).softmax(-1)

    def finish(self, out, x):
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)


IDIOMS = [TimmEfficientVitMsra, ChannelsFirstValuesLeft, Swinv2CosineAttention, PerHeadTemperature,
          Gemma2SoftcapScores]


def _model(cls: type) -> Idiom:
    torch.manual_seed(0)
    return cls().eval()


def _band(s: int) -> torch.Tensor:
    """Bidirectional Sparse(window=WINDOW, sinks=0): query i sees keys with |i - j| <= WINDOW // 2."""
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return (i - j).abs() <= WINDOW // 2


def _ops(ep: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "attnrw" in str(n.target)]


def check_peaked(cls: type) -> None:
    """The idiom equals its reference and its attention is far from uniform (what makes equalities count)."""
    model = _model(cls)
    x = model.example(model.lengths[0])
    with torch.no_grad():
        top = model.probs(x).max(-1).values.mean().item()
        torch.testing.assert_close(model(x), model.reference(x), atol=ATOL, rtol=0)
    assert top > 0.4, f"attention too close to uniform (mean top probability {top:.2f})"


@pytest.mark.parametrize("cls", IDIOMS, ids=lambda c: c.__name__)
def test_attention_is_peaked(cls: type) -> None:
    check_peaked(cls)


@pytest.mark.parametrize("cls", IDIOMS, ids=lambda c: c.__name__)
def test_found_and_exact_through_export(cls: type) -> None:
    model = _model(cls)
    traced, other = (model.example(s) for s in model.lengths)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (traced,), dynamic_shapes=model.dynamic_shapes(), report=reports)
        assert len(reports[0].sites) == 1 and not reports[0].skipped, str(reports[0])
        assert _ops(ep) == ["attnrw.attention.default"]
        assert not any("softmax" in str(n.target) for n in ep.graph.nodes)
        for x in (traced, other):
            torch.testing.assert_close(ep.module()(x), model(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls", IDIOMS, ids=lambda c: c.__name__)
def test_found_and_exact_under_compile(cls: type) -> None:
    model = _model(cls)
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(attnrw.Dense(), on_report=reports.append, inner="eager"))
    with torch.no_grad():
        for s in model.lengths:
            x = model.example(s)
            torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    assert reports and all(len(r.sites) == 1 and not r.skipped for r in reports), "\n".join(map(str, reports))
    assert all([d.op for d in r.decisions] == ["attention"] for r in reports)


@pytest.mark.parametrize("cls", IDIOMS, ids=lambda c: c.__name__)
def test_sparse_equals_banded_reference(cls: type) -> None:
    model = _model(cls)
    x = model.example(model.lengths[1])
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (x,), policy=attnrw.Sparse(window=WINDOW, sinks=0), report=reports)
        out = ep.module()(x)
        ref = model.reference(x, _band(model.lengths[1]))
        dense = model(x)
    (site,) = reports[0].sites
    assert site.self_attention and not site.causal, site
    assert [d.op for d in reports[0].decisions] == ["sparse_attention"]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert (out - dense).abs().max().item() > 1e-3, "the band must change the result at this length"
