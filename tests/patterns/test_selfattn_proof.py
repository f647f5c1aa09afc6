"""The shared-sequence proof through projections other than linear layers (attnrw.patterns.tokens).

A bidirectional site is self-attention when query i and key i are provably
position i of one tensor. These idioms build q, k and v with separate
projections of kinds the proof must follow along the token axis: grouped
1×1 Conv1d in (N, C, W) layout (SqueezeBERT), 1×1 Conv2d over a feature map
whose H·W positions are the tokens (latent-diffusion's ``AttnBlock``), and a
channel gate broadcast over the tokens (squeeze-and-excitation). The near
misses convolve the keys with a kernel of 3: key i mixes positions i-1..i+1
(or i-2, i, i+2), so query i and key i are not proven one position, and
Sparse must keep the site dense and say why.

Projection weights are multiplied by ``GAIN`` (``test_attention_is_peaked``
checks the softmax is far from uniform), so that a band on the wrong axis,
or a wrong rewrite, shows above the tolerance. Each idiom is traced at one
length and run at another.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnrw
from tests.patterns.test_idioms import ATOL, WINDOW, Idiom, _band, _gain, _model, _ops, check_peaked

SPARSE = attnrw.Sparse(window=WINDOW, sinks=0)


class SqueezeBertConv1dAttention(Idiom):
    """HF SqueezeBERT's self-attention: q, k, v from grouped ``Conv1d(kernel_size=1)`` on (N, C, W).

    Heads are split from the channels: q and v are viewed (N, H, D, W) and
    permuted to (N, H, W, D); k stays (N, H, D, W), already transposed for
    ``q @ k``. The tokens are the last axis of the convolutions' output.
    ``lengths[0]`` equals the head size: at that length the sizes alone
    cannot tell tokens from channels.
    """

    lengths = (8, 13)

    def __init__(self, c: int = 16, heads: int = 2, groups: int = 2, key_kernel: int = 1, key_dilation: int = 1):
        super().__init__()
        self.heads, self.d = heads, c // heads
        pad = key_dilation * (key_kernel - 1) // 2
        self.query = nn.Conv1d(c, c, 1, groups=groups)
        self.key = nn.Conv1d(c, c, key_kernel, padding=pad, dilation=key_dilation, groups=groups)
        self.value = nn.Conv1d(c, c, 1, groups=groups)
        _gain(self.query, self.key)

    def example(self, s: int, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 16, s)

    def dynamic_shapes(self) -> dict:
        return {"x": {2: torch.export.Dim("seq", min=2, max=64)}}

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.heads, self.d, x.shape[-1])  # (N, H, D, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.query(x)).permute(0, 1, 3, 2)
        k = self._heads(self.key(x))
        v = self._heads(self.value(x)).permute(0, 1, 3, 2)
        scores = torch.matmul(q, k) / math.sqrt(self.d)
        ctx = torch.matmul(scores.softmax(dim=-1), v)
        return ctx.permute(0, 1, 3, 2).contiguous().view(x.shape[0], -1, x.shape[-1])

    def canonical(self, x):
        q = self._heads(self.query(x)).transpose(-1, -2)
        k = self._heads(self.key(x)).transpose(-1, -2)
        v = self._heads(self.value(x)).transpose(-1, -2)
        return q, k, v, 1 / math.sqrt(self.d)

    def finish(self, out, x):
        return out.transpose(-1, -2).reshape(x.shape[0], -1, x.shape[-1])


class SqueezeExciteGatedKeys(SqueezeBertConv1dAttention):
    """The same, with the keys gated per channel by a squeeze-and-excitation block (SENet, MobileNetV3).

    The gate, ``sigmoid(W·mean over tokens)`` of shape (N, C, 1), is one
    value per sample and channel broadcast over every position: it does not
    move tokens, so the proof goes past it through the product to the conv.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Conv1d(16, 16, 1)

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return self.key(x) * torch.sigmoid(self.gate(x.mean(-1, keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.query(x)).permute(0, 1, 3, 2)
        k = self._heads(self._key(x))
        v = self._heads(self.value(x)).permute(0, 1, 3, 2)
        ctx = (torch.matmul(q, k) / math.sqrt(self.d)).softmax(dim=-1) @ v
        return ctx.permute(0, 1, 3, 2).reshape(x.shape[0], -1, x.shape[-1])

    def canonical(self, x):
        q, _, v, scale = super().canonical(x)
        return q, self._heads(self._key(x)).transpose(-1, -2), v, scale


class LatentDiffusionAttnBlock(Idiom):
    """CompVis latent-diffusion's (and taming-transformers') ``AttnBlock``: 1×1 Conv2d q, k, v on a feature map.

    The tokens are the H·W positions, flattened after the convolutions
    (``q.reshape(b, c, h*w).permute(0, 2, 1)``); one head of all channels;
    ``bmm(v, w_.permute(0, 2, 1))`` takes the probabilities as the right operand.
    """

    lengths = (12, 20)  # 3×4 and 4×5 maps

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(4, c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)
        _gain(self.q, self.k)

    def example(self, s: int, batch: int = 2) -> torch.Tensor:
        h = {12: 3, 20: 4}[s]
        return torch.randn(batch, 16, h, s // h)

    def dynamic_shapes(self) -> dict:
        return {"x": {2: torch.export.Dim("h", min=2, max=16), 3: torch.export.Dim("w", min=2, max=16)}}

    def _qkv(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        return (t.reshape(b, c, hh * ww) for t in (self.q(h), self.k(h), self.v(h)))  # (B, C, N)

    def forward(self, x):
        q, k, v = self._qkv(x)
        b, c, hh, ww = x.shape
        w_ = torch.bmm(q.permute(0, 2, 1), k) * (int(c) ** (-0.5))
        w_ = F.softmax(w_, dim=2)
        h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h_)

    def canonical(self, x):
        q, k, v = (t.transpose(1, 2)[:, None] for t in self._qkv(x))  # (B, 1, N, C)
        return q, k, v, x.shape[1] ** -0.5

    def finish(self, out, x):
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(x.shape))


class Conv1dKernel3Attention(SqueezeBertConv1dAttention):
    """Near miss: the keys come from ``Conv1d(kernel_size=3, padding=1)``; key i mixes positions i-1..i+1."""

    def __init__(self) -> None:
        super().__init__(key_kernel=3)


class Conv1dDilatedKernel3Attention(SqueezeBertConv1dAttention):
    """Near miss: ``Conv1d(kernel_size=3, dilation=2, padding=2)`` keys, mixing positions i-2, i, i+2."""

    def __init__(self) -> None:
        super().__init__(key_kernel=3, key_dilation=2)


ALIGNED = [SqueezeBertConv1dAttention, SqueezeExciteGatedKeys, LatentDiffusionAttnBlock]
NEAR_MISSES = [Conv1dKernel3Attention, Conv1dDilatedKernel3Attention]


@pytest.mark.parametrize("cls", ALIGNED + NEAR_MISSES, ids=lambda c: c.__name__)
def test_attention_is_peaked(cls: type) -> None:
    check_peaked(cls)


@pytest.mark.parametrize("cls", ALIGNED + NEAR_MISSES, ids=lambda c: c.__name__)
def test_found_and_exact_through_export(cls: type) -> None:
    model = _model(cls)
    traced, other = (model.example(s) for s in model.lengths)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (traced,), dynamic_shapes=model.dynamic_shapes(), report=reports)
        (site,) = reports[0].sites
        assert not reports[0].skipped, str(reports[0])
        assert site.self_attention is (cls in ALIGNED) and site.attended_axis == "tokens", site
        assert _ops(ep) == ["attnrw.attention.default"]
        for x in (traced, other):
            torch.testing.assert_close(ep.module()(x), model(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls", ALIGNED + NEAR_MISSES, ids=lambda c: c.__name__)
def test_proof_under_compile(cls: type) -> None:
    model = _model(cls)
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(SPARSE, on_report=reports.append, inner="eager"))
    with torch.no_grad():
        for s in model.lengths:
            x = model.example(s)
            expected = model.reference(x, _band(s)) if cls in ALIGNED else model(x)
            torch.testing.assert_close(compiled(x), expected, atol=ATOL, rtol=0)
    assert reports and all(len(r.sites) == 1 for r in reports), "\n".join(map(str, reports))
    assert all(r.sites[0].self_attention is (cls in ALIGNED) for r in reports)


@pytest.mark.parametrize("cls", ALIGNED, ids=lambda c: c.__name__)
def test_sparse_equals_banded_reference(cls: type) -> None:
    model = _model(cls)
    traced, other = (model.example(s) for s in model.lengths)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (traced,), policy=SPARSE, dynamic_shapes=model.dynamic_shapes(), report=reports)
        assert [d.op for d in reports[0].decisions] == ["sparse_attention"], str(reports[0])
        for x, s in ((traced, model.lengths[0]), (other, model.lengths[1])):
            out = ep.module()(x)
            torch.testing.assert_close(out, model.reference(x, _band(s)), atol=ATOL, rtol=0)
            assert (out - model(x)).abs().max().item() > 1e-3, "the band must change the result at this length"


@pytest.mark.parametrize("cls", NEAR_MISSES, ids=lambda c: c.__name__)
def test_near_miss_stays_dense_with_the_reason(cls: type) -> None:
    model = _model(cls)
    x = model.example(model.lengths[1])
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (x,), policy=SPARSE, report=reports)
        out = ep.module()(x)
        dense = model(x)
    (site,) = reports[0].sites
    assert not site.self_attention and site.attended_axis == "tokens" and site.q_len == site.kv_len, site
    (decision,) = reports[0].decisions
    assert decision.op == "attention" and "not one aligned sequence" in decision.note, decision
    torch.testing.assert_close(out, dense, atol=ATOL, rtol=0)


def test_head_size_equal_to_length_is_not_mistaken_for_channels() -> None:
    """At a static length equal to the head size, the key axis is found by following k, not by its size."""
    model = _model(SqueezeBertConv1dAttention)
    assert model.lengths[0] == model.d
    (site,) = attnrw.inspect(model, (model.example(model.d),)).sites
    assert site.attended_axis == "tokens" and site.self_attention, site


# -- HF SqueezeBERT from a config --------------------------------------------------------


class _BandedSoftmax(nn.Module):
    """Softmax over keys within the bidirectional Sparse band: the reference for one attention module."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        s = scores.shape[-1]
        return scores.masked_fill(~_band(s), float("-inf")).softmax(-1)


#: The std of SqueezeBERT's query and key conv weights in these tests.
QK_STD = 0.5


def _squeezebert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.SqueezeBertConfig(
        vocab_size=100, hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=1,
        intermediate_groups=2, output_groups=2,
    )
    torch.manual_seed(0)
    model = transformers.SqueezeBertModel(config).eval()
    with torch.no_grad():
        # HF initialises with std 0.02: scores of ~1e-3 and a uniform softmax. With std
        # QK_STD the mean top probability is well above 0.4 (checked in the test).
        for layer in model.encoder.layers:
            layer.attention.query.weight.normal_(0.0, QK_STD)
            layer.attention.key.weight.normal_(0.0, QK_STD)
    return model


def _ids(s: int) -> torch.Tensor:
    return torch.randint(0, 100, (2, s), generator=torch.Generator().manual_seed(s))


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state


def test_hf_squeezebert_is_self_attention() -> None:
    """16 tokens and a head size of 16, as in the report: both sites are self-attention over tokens."""
    model = _squeezebert()
    sites = attnrw.inspect(model, (), {"input_ids": _ids(16)[:1]}).sites
    assert len(sites) == 2
    assert all(s.self_attention and s.attended_axis == "tokens" and s.head_dim == 16 for s in sites), sites


def test_hf_squeezebert_dense_and_sparse() -> None:
    model = _squeezebert()
    traced, other = _ids(16), _ids(11)
    dyn = {"input_ids": {1: torch.export.Dim("seq", min=2, max=64)}}
    banded = copy.deepcopy(model)
    for layer in banded.encoder.layers:
        layer.attention.softmax = _BandedSoftmax()
    with torch.no_grad():
        probs = []
        hook = model.encoder.layers[0].attention.softmax.register_forward_hook(lambda m, i, o: probs.append(o))
        model(input_ids=traced)
        hook.remove()
        assert probs[0].max(-1).values.mean().item() > 0.4, "attention too close to uniform"

        reports: list[attnrw.Report] = []
        dense = attnrw.rewrite(model, (), {"input_ids": traced}, dynamic_shapes=dyn, report=reports)
        assert len(reports[0].sites) == 2 and all(s.self_attention for s in reports[0].sites), str(reports[0])
        sparse = attnrw.rewrite(model, (), {"input_ids": traced}, policy=SPARSE, dynamic_shapes=dyn, report=reports)
        assert [d.op for d in reports[1].decisions] == ["sparse_attention"] * 2, str(reports[1])
        for ids in (traced, other):
            eager = _hidden(model, ids)
            torch.testing.assert_close(_hidden(dense.module(), ids), eager, atol=ATOL, rtol=0)
            out = _hidden(sparse.module(), ids)
            torch.testing.assert_close(out, _hidden(banded, ids), atol=ATOL, rtol=0)
            assert (out - eager).abs().max().item() > 1e-3, "the band must change the result at this length"


def test_hf_squeezebert_condense_applies() -> None:
    """Condense needs the same proof: it now lowers both sites instead of keeping them dense."""
    model = _squeezebert()
    reports: list[attnrw.Report] = []
    attnrw.rewrite(model, (), {"input_ids": _ids(16)}, policy=attnrw.Condense(recent=4, group=4), report=reports)
    assert all(d.op != "attention" for d in reports[0].decisions), str(reports[0])


# -- the step rules, one at a time (inspect only) ------------------------------------------


class _TwoProjections(nn.Module):
    """softmax(q·kᵀ/√d)·v with q, k, v of shape (B, S, D) from ``self.qk(x)``; one head."""

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qk(x)
        return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1) @ v


class ConvQueriesLinearKeys(_TwoProjections):
    """(B, S, C) tokens: q from a 1×1 Conv1d on the channels-first permute, k and v from linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Conv1d(16, 16, 1), nn.Linear(16, 16), nn.Linear(16, 16)

    def qk(self, x):
        return self.q(x.transpose(1, 2)).transpose(1, 2), self.k(x), self.v(x)


class Conv2dTokensFoldedWithBatch(_TwoProjections):
    """(B, C, H, W) map: q from a 1×1 Conv2d, k from a linear layer over (B·H·W, C) rows."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Conv2d(16, 16, 1), nn.Linear(16, 16), nn.Linear(16, 16)

    def qk(self, x):
        b, c = x.shape[:2]
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # (B·H·W, C)
        return (self.q(x).flatten(2).transpose(1, 2), self.k(rows).view(b, -1, c), self.v(rows).view(b, -1, c))


class RolledKeys(_TwoProjections):
    """Near miss: the keys are the tokens shifted by one (``roll``): key i is position i-1."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Conv1d(16, 16, 1), nn.Conv1d(16, 16, 1), nn.Conv1d(16, 16, 1)

    def qk(self, x):
        xt = x.transpose(1, 2)
        return self.q(xt).transpose(1, 2), self.k(xt.roll(1, -1)).transpose(1, 2), self.v(xt).transpose(1, 2)


class FlippedKeys(RolledKeys):
    """Near miss: the keys are the tokens in reverse order."""

    def qk(self, x):
        xt = x.transpose(1, 2)
        return self.q(xt).transpose(1, 2), self.k(xt.flip(-1)).transpose(1, 2), self.v(xt).transpose(1, 2)


class KeysFromChannelsOfEqualSize(_TwoProjections):
    """Near miss: S == C and the keys project x's transpose, so key i is channel i of every token."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def qk(self, x):
        return self.q(x), self.k(x.transpose(1, 2)), self.v(x)


class KeysKernel2Conv(_TwoProjections):
    """Near miss: keys from a kernel-2, stride-1, no-padding conv of the tokens padded by one at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Conv1d(16, 16, 1), nn.Conv1d(16, 16, 2), nn.Conv1d(16, 16, 1)

    def qk(self, x):
        xt = x.transpose(1, 2)
        return self.q(xt).transpose(1, 2), self.k(F.pad(xt, (0, 1))).transpose(1, 2), self.v(xt).transpose(1, 2)


STEP_CASES = [
    (ConvQueriesLinearKeys, True, (2, 16, 16)),
    (Conv2dTokensFoldedWithBatch, True, (2, 16, 4, 4)),
    (RolledKeys, False, (2, 16, 16)),
    (FlippedKeys, False, (2, 16, 16)),
    (KeysFromChannelsOfEqualSize, False, (2, 16, 16)),
    (KeysKernel2Conv, False, (2, 16, 16)),
]


@pytest.mark.parametrize("cls, expected, dims", STEP_CASES, ids=[c[0].__name__ for c in STEP_CASES])
def test_step_rules(cls: type, expected: bool, dims: tuple) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(*dims)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (x,), policy=SPARSE, report=reports)
        (site,) = reports[0].sites
        assert site.self_attention is expected, site
        if not expected:
            torch.testing.assert_close(ep.module()(x), model(x), atol=ATOL, rtol=0)
