"""``attnrw.Bias``: a score bias added before softmax, exact against a hand-written reference.

The model computes its attention by hand (GQA through ``repeat_interleave``,
a causal ``masked_fill``, an additive padding mask); its reference form adds
the same bias to the scores in its own code. The rewrite of the unmodified
model must match that reference, at the traced length and at others.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnrw
from attnrw.rewriter.lowering import _bias_graph


def span_boost(b, h, q_idx, kv_idx):
    """+3 on keys 2..5: large enough to move near-uniform attention visibly."""
    return torch.where((kv_idx >= 2) & (kv_idx < 6), 3.0, 0.0)


def relative_penalty(b, h, q_idx, kv_idx):
    """An ALiBi-like distance penalty that differs per head and per batch row."""
    return -(0.3 + 0.2 * h + 0.1 * b) * (q_idx - kv_idx).abs()


class Attn(torch.nn.Module):
    def __init__(self, heads: int = 4, kv_heads: int = 4, dim: int = 32, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.causal = heads, kv_heads, dim // heads, causal
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.hd)
        self.reference_bias = None  # the hand-written reference: add this fn's bias to the scores

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / self.hd**0.5
        if self.reference_bias is not None:
            idx = [torch.arange(n).view([-1 if i == j else 1 for j in range(4)])
                   for i, n in enumerate(scores.shape)]
            scores = scores + self.reference_bias(*idx)
        if pad is not None:  # (B, S) with 1 for real tokens
            scores = scores + (1.0 - pad[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        if self.causal:
            keep = torch.ones(s, s, dtype=torch.bool).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)


def _model(**kw) -> Attn:
    torch.manual_seed(0)
    return Attn(**kw).eval()


def _reference(model: Attn, fn, *args):
    model.reference_bias = fn
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        model.reference_bias = None


def _assert_exact(out, ref, plain) -> None:
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (ref - plain).abs().max() > 0.05, "the bias must change the output for this test to mean anything"


CASES = {
    "mha": dict(heads=4, kv_heads=4),
    "gqa": dict(heads=4, kv_heads=2),
    "causal": dict(heads=4, kv_heads=2, causal=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fn", [span_boost, relative_penalty], ids=["span", "distance"])
@torch.no_grad()
def test_rewrite_is_exact_at_other_lengths(case: str, fn) -> None:
    model = _model(**CASES[case])
    x = torch.randn(2, 12, 32)
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = attnrw.rewrite(model, (x,), policy=attnrw.Bias(fn), dynamic_shapes=({1: seq},))
    assert torch.ops.attnrw.attention.default in {n.target for n in ep.graph_module.graph.nodes}
    for s in (12, 29):
        x = torch.randn(2, s, 32)
        _assert_exact(ep.module()(x), _reference(model, fn, x), model(x))


@torch.no_grad()
def test_padding_stays_masked() -> None:
    model = _model(heads=4, kv_heads=2)
    x = torch.randn(2, 10, 32)
    pad = torch.ones(2, 10)
    pad[1, 6:] = 0
    ep = attnrw.rewrite(model, (x, pad), policy=attnrw.Bias(span_boost))
    out = ep.module()(x, pad)
    _assert_exact(out, _reference(model, span_boost, x, pad), model(x, pad))
    # The padded keys still get no weight: changing them leaves the real rows as they were.
    x2 = x.clone()
    x2[1, 6:] = torch.randn(4, 32)
    torch.testing.assert_close(ep.module()(x2, pad)[1, :6], out[1, :6], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_compile_dynamic_and_heads() -> None:
    model = _model(heads=4, kv_heads=2, causal=True)
    policy = attnrw.Bias(relative_penalty, heads=(1, 3))

    def selected(b, h, q_idx, kv_idx):
        return relative_penalty(b, h, q_idx, kv_idx) * ((h == 1) | (h == 3))

    compiled = torch.compile(model, backend=attnrw.backend(policy, inner="eager"), dynamic=True)
    for s in (7, 19):
        x = torch.randn(1, s, 32)
        _assert_exact(compiled(x), _reference(model, selected, x), model(x))


@torch.no_grad()
def test_globs_select_sites() -> None:
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = _model(), _model()

        def forward(self, x):
            return self.b(self.a(x))

    model = Two().eval()
    x = torch.randn(1, 9, 32)
    reports: list[attnrw.Report] = []
    ep = attnrw.rewrite(model, (x,), policy={"b": attnrw.Bias(span_boost)}, report=reports)
    model.b.reference_bias = span_boost
    ref = model(x)
    model.b.reference_bias = None
    torch.testing.assert_close(ep.module()(x), ref, atol=1e-5, rtol=1e-5)
    assert [d.policy for d in reports[0].decisions] == ["-", "bias"]


def test_onnx_runs_in_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = _model(heads=4, kv_heads=2, causal=True)
    x = torch.randn(1, 11, 32)
    path = attnrw.export.to_onnx(model, (x,), tmp_path / "bias.onnx", policy=attnrw.Bias(span_boost))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    _assert_exact(torch.from_numpy(out), _reference(model, span_boost, x), model(x).detach())


def test_plan_round_trip_names_the_function() -> None:
    policy = attnrw.Bias(span_boost, heads=[0, 2])
    d = policy.to_dict()
    assert d == {"policy": "bias", "fn": f"{__name__}:span_boost", "heads": [0, 2]}
    assert attnrw.policy_from_dict(d) == policy
    with pytest.raises(attnrw.ConfigError, match="importable"):
        attnrw.Bias(lambda b, h, q, k: q - k).to_dict()


def test_bad_bias_functions_are_refused() -> None:
    with pytest.raises(attnrw.ConfigError, match="sizes"):
        _bias_graph(lambda b, h, q, k: k * 0 + k.shape[-1] - k)
    table = torch.arange(64.0)
    with pytest.raises(attnrw.ConfigError, match="tensor constants"):
        _bias_graph(lambda b, h, q, k: table[k])
    with pytest.raises(attnrw.ConfigError, match="function"):
        attnrw.Bias(3)
    with pytest.raises(attnrw.ConfigError, match="heads"):
        attnrw.Bias(span_boost, heads=())
    with pytest.raises(attnrw.ConfigError, match="cannot import"):
        attnrw.Bias("no_such_module_attnrw:fn")
