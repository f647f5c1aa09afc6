"""Attention-logit softcapping: the ops' ``softcap`` against the textbook formula, and HF Gemma 2 end to end.

The idiom module (``Gemma2SoftcapScores``) is in ``test_idioms.py``; here the
op numerics (forward and backward, dense and sparse, in float64 so that an
error in the cap's slope shows), what a policy without a softcap does, and
the causal HF model with the cap small enough that leaving it out changes
the output (checked).
"""

from __future__ import annotations

import pytest
import torch

import attnrw
from attnrw.errors import ImplementationUnavailableError
from attnrw.kernels.attention import math_attention

CAP = 2.0


def _qkv(s: int = 37, heads: int = 4, kv_heads: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shapes = ((2, heads, s, 8), (2, kv_heads, s, 8), (2, kv_heads, s, 8))
    return tuple((torch.randn(sh, generator=g, dtype=torch.float64) * 3).requires_grad_() for sh in shapes)


def _band(s: int, window: int, sinks: int) -> torch.Tensor:
    """Causal Sparse(window, sinks): query i sees keys i - window < j <= i, and the first ``sinks``."""
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_op_softcap_matches_formula(causal: bool) -> None:
    q, k, v = _qkv()
    mask = torch.randn(2, 1, 37, 37, dtype=torch.float64).requires_grad_()
    out = torch.ops.attnrw.attention(q, k, v, mask, causal, 0.3, softcap=CAP)
    ref = math_attention(q, k, v, mask, causal, 0.3, CAP)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(_grads(out, (q, k, v, mask)), _grads(ref, (q, k, v, mask))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert (out - math_attention(q, k, v, mask, causal, 0.3)).abs().max() > 0.1, "the cap must matter here"


@pytest.mark.parametrize("window, sinks", [(8, 2), (16, 0)])
def test_sparse_op_caps_before_the_window(window: int, sinks: int) -> None:
    q, k, v = _qkv()
    mask = torch.randn(2, 1, 37, 37, dtype=torch.float64).requires_grad_()
    out = torch.ops.attnrw.sparse_attention(q, k, v, mask, True, 0.3, window, sinks, 0, 16, "auto", softcap=CAP)
    banded = torch.where(_band(37, window, sinks), mask, float("-inf"))
    ref = math_attention(q, k, v, banded, False, 0.3, CAP)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(_grads(out, (q, k, v, mask)), _grads(ref, (q, k, v, mask))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_softcap_ops_pass_opcheck() -> None:
    q, k, v = (t.detach() for t in _qkv(s=12))
    torch.library.opcheck(torch.ops.attnrw.attention.default, (q, k, v, None, True, 0.3), {"softcap": CAP})
    torch.library.opcheck(torch.ops.attnrw.sparse_attention.default,
                          (q, k, v, None, True, 0.3, 4, 1, 0, 4, "torch"), {"softcap": CAP})


def test_triton_sparse_refuses_a_softcap() -> None:
    q, k, v = (t.detach() for t in _qkv(s=12))
    with pytest.raises(ImplementationUnavailableError, match="does not softcap"):
        torch.ops.attnrw.sparse_attention(q, k, v, None, True, 0.3, 4, 1, 0, 4, "triton", softcap=CAP)


# -- HF Gemma 2 ----------------------------------------------------------------------------


def _gemma2(sliding_window: int = 64) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attn_logit_softcapping=CAP, final_logit_softcapping=None,
        sliding_window=sliding_window, max_position_embeddings=128, use_cache=False, attn_implementation="eager",
        query_pre_attn_scalar=8,
    )
    model = transformers.Gemma2Model(cfg).eval()
    with torch.no_grad():  # peaked scores, far above the cap: leaving the cap out would show
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(6)
    return model


def _hidden(out: object) -> torch.Tensor:
    """A saved program returns a plain dict (or tuple) in place of the model's output class."""
    return out["last_hidden_state"] if isinstance(out, dict) else out[0]


def _ids(s: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (2, s), generator=torch.Generator().manual_seed(s))}


def test_hf_gemma2_found_with_softcap_and_exact() -> None:
    model = _gemma2()
    kw = _ids(20)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (), kw, report=reports)
        ref = model(**kw).last_hidden_state
        torch.testing.assert_close(_hidden(ep.module()(**kw)), ref, atol=1e-5, rtol=0)
        uncapped = _gemma2()
        for layer in uncapped.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (uncapped(**kw).last_hidden_state - ref).abs().max() > 1e-2, "the cap must matter here"
    sites = reports[0].sites
    assert len(sites) == 2 and all(s.softcap == CAP and s.causal for s in sites), str(reports[0])
    assert all(s.scale == pytest.approx(8**-0.5) for s in sites)


def test_hf_gemma2_under_compile_at_two_lengths() -> None:
    model = _gemma2()
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(attnrw.Dense(), on_report=reports.append, inner="eager"))
    with torch.no_grad():
        for s in (12, 20):
            kw = _ids(s)
            torch.testing.assert_close(compiled(**kw).last_hidden_state, model(**kw).last_hidden_state,
                                       atol=1e-5, rtol=0)
    assert reports and all(s.softcap == CAP for r in reports for s in r.sites)


def test_hf_gemma2_sparse_equals_gemma2_sliding_window() -> None:
    """Sparse(window=W, sinks=0) on a capped site is Gemma 2's own sliding-window layer with that window."""
    window = 6
    model, banded = _gemma2(), _gemma2(sliding_window=window)
    banded.config.layer_types = ["sliding_attention"] * 2
    for layer in banded.layers:
        layer.attention_type = "sliding_attention"
        layer.self_attn.sliding_window = window
        layer.self_attn.is_sliding = True
    kw = _ids(20)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (), kw, policy=attnrw.Sparse(window=window, sinks=0), report=reports)
        out = _hidden(ep.module()(**kw))
        ref = banded(**kw).last_hidden_state
        dense = model(**kw).last_hidden_state
    assert [d.op for d in reports[0].decisions] == ["sparse_attention"] * 2, str(reports[0])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - dense).abs().max() > 1e-3, "the window must change the result at this length"


def test_policy_without_softcap_keeps_the_site_dense_and_says_why() -> None:
    model = _gemma2()
    kw = _ids(20)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (), kw, policy=attnrw.Condense(recent=4, group=2), report=reports)
        torch.testing.assert_close(_hidden(ep.module()(**kw)), model(**kw).last_hidden_state, atol=1e-5, rtol=0)
    decisions = reports[0].decisions
    assert [d.op for d in decisions] == ["attention"] * 2
    assert all("no softcap argument" in d.note for d in decisions), str(reports[0])
