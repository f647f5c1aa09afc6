"""Property tests: generated hand-written attention is found and rewritten exactly; near-misses are not.

Each generated module spells softmax(Q·Kᵀ·scale + mask)·V a different way:
layout (heads as an axis, folded into the batch, heads-last via einsum), how
K is transposed (transpose, permute, stored pre-transposed), the scale form
(after the product by mul or div, on Q before, split as sqrt on Q and K,
none, a per-head tensor multiplying the masked scores or dividing them
before the mask), the mask (none, additive padding, boolean masked_fill, a tril buffer,
where(), a learned position bias), grouped-query attention (repeat_kv via
expand+reshape, or repeat_interleave), softmax upcast, dtype, and which
operand of the product with values the probabilities are (P·V, or
(Vᵀ·Pᵀ)ᵀ with channels-first values).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import attnrw

#: Tolerance per dtype of an exact rewrite: fp32/fp64 as DESIGN.md states;
#: bf16 keeps 8 bits of mantissa and the fused kernel rounds in another order.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 3e-2}

#: ``einsum_perm``: Q·Kᵀ (and, as a PV choice, P·V) by ``einsum`` on operands permuted by drawn
#: permutations, the result in a drawn layout permuted back (HF Funnel / XLNet write such products).
LAYOUTS = ("heads", "folded", "einsum_bshd", "einsum_perm")
KEY_FORMS = ("transpose", "permute", "pretransposed")
SCALES = ("mul_after", "div_after", "q_before", "sqrt_both", "none", "head_tensor", "head_tensor_div")
#: Scale forms whose value is a tensor (one per head): the site reports only the constant part.
TENSOR_SCALES = ("head_tensor", "head_tensor_div")
MASKS = ("none", "additive", "bool_fill", "tril_buffer", "causal_where", "bias")
GQA = ("none", "repeat_kv", "repeat_interleave")
PV = ("left", "right", "einsum_perm")
#: Gemma 2's attention-logit softcap ``tanh(s / cap) * cap``, before the mask; 0: none.
SOFTCAPS = (0.0, 0.0, 2.0)


class HandWritten(nn.Module):
    """A hand-written attention block assembled from the drawn spelling choices."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        e, h, hkv, d = cfg["embed"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        self.q = nn.Linear(e, h * d)
        self.k = nn.Linear(e, hkv * d)
        self.v = nn.Linear(e, hkv * d)
        self.o = nn.Linear(h * d, e)
        s = cfg["seq"]
        self.register_buffer("tril", torch.tril(torch.ones(s, s, dtype=torch.bool)).view(1, 1, s, s))
        self.bias = nn.Parameter(torch.randn(1, h, s, s) * 0.1)
        # Per-head temperatures between about 0.5 and 2, as (1, H, 1, 1) and (H, 1, 1).
        self.temperature = nn.Parameter(torch.linspace(-0.7, 0.7, h).view(1, h, 1, 1))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        b, s, _ = x.shape
        h, hkv, d = c["heads"], c["kv_heads"], c["head_dim"]
        q = self.q(x).view(b, s, h, d)
        k = self.k(x).view(b, s, hkv, d)
        v = self.v(x).view(b, s, hkv, d)
        scale = 1.0 / math.sqrt(d)
        if c["scale"] == "q_before":
            q = q * scale
        elif c["scale"] == "sqrt_both":
            q = q * math.sqrt(scale)
            k = k * math.sqrt(scale)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if hkv != h:
            n = h // hkv
            if c["gqa"] == "repeat_interleave":
                k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
            else:
                k = k[:, :, None].expand(b, hkv, n, s, d).reshape(b, h, s, d)
                v = v[:, :, None].expand(b, hkv, n, s, d).reshape(b, h, s, d)
        if c["layout"] == "folded":
            scores = torch.bmm(q.reshape(b * h, s, d), self._kt(k).reshape(b * h, d, s)).view(b, h, s, s)
        elif c["layout"] == "einsum_bshd":
            scores = torch.einsum("bqhd,bkhd->bhqk", q.transpose(1, 2), k.transpose(1, 2))
        elif c["layout"] == "einsum_perm":
            scores = _permuted_einsum(q, "bhqd", k, "bhkd", "bhqk", c["perms"][:3])
        else:
            scores = q @ self._kt(k)
        if c["scale"] == "mul_after":
            scores = scores * scale
        elif c["scale"] == "div_after":
            scores = scores / math.sqrt(d)
        elif c["scale"] == "head_tensor_div":
            scores = scores / self.temperature.exp().view(h, 1, 1).to(scores.dtype)
        if c["softcap"]:
            scores = torch.tanh(scores / c["softcap"]) * c["softcap"]
        scores = self._mask(scores, pad)
        if c["scale"] == "head_tensor":
            scores = scores * self.temperature.exp().to(scores.dtype)
        if c["upcast"]:
            probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        else:
            probs = scores.softmax(dim=-1)
        if c["pv"] == "right":
            out = (v.transpose(-2, -1) @ probs.transpose(-2, -1)).transpose(-2, -1)
        elif c["pv"] == "einsum_perm":
            out = _permuted_einsum(probs, "bhqk", v, "bhkd", "bhqd", c["perms"][3:])
        else:
            out = probs @ v
        return self.o(out.transpose(1, 2).reshape(b, s, h * d))

    def _kt(self, k: torch.Tensor) -> torch.Tensor:
        form = self.cfg["key_form"]
        if form == "permute":
            return k.permute(0, 1, 3, 2)
        if form == "pretransposed":
            return k.transpose(-1, -2).contiguous()
        return k.transpose(-2, -1)

    def _mask(self, scores: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        kind = self.cfg["mask"]
        s = scores.shape[-1]
        if kind == "additive":
            return scores + (1.0 - pad[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        if kind == "bool_fill":
            return scores.masked_fill(pad[:, None, None, :] == 0, float("-inf"))
        if kind == "tril_buffer":
            return scores.masked_fill(~self.tril[:, :, :s, :s], torch.finfo(scores.dtype).min)
        if kind == "causal_where":
            i = torch.arange(s, device=scores.device)
            keep = i[None, :] <= i[:, None]
            return torch.where(keep, scores, torch.tensor(-1e9, dtype=scores.dtype))
        if kind == "bias":
            return scores + self.bias.to(scores.dtype)
        return scores


def _permuted_einsum(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, lout: str,
                     perms: list[tuple[int, ...]]) -> torch.Tensor:
    """``einsum(la, lb -> lout)`` written on ``a`` and ``b`` permuted by ``perms[0]`` and ``perms[1]``, into the
    layout ``perms[2]`` of ``lout``, then permuted back to ``lout``: the same value as the plain product."""
    pa, pb, po = perms
    spec = f"{''.join(la[i] for i in pa)},{''.join(lb[i] for i in pb)}->{''.join(lout[i] for i in po)}"
    out = torch.einsum(spec, a.permute(pa), b.permute(pb))
    return out.permute([po.index(i) for i in range(4)])


@st.composite
def configs(draw: st.DrawFn) -> dict:
    heads = draw(st.sampled_from((2, 4)))
    gqa = draw(st.sampled_from(GQA))
    kv_heads = heads if gqa == "none" else draw(st.sampled_from([h for h in (1, 2) if heads % h == 0 and h < heads]))
    scale = draw(st.sampled_from(SCALES))
    # A tensor scale applied after the mask sits outside the cap's tanh: that is not a softcap.
    softcap = 0.0 if scale == "head_tensor" else draw(st.sampled_from(SOFTCAPS))
    return {
        "heads": heads,
        "kv_heads": kv_heads,
        "gqa": gqa if kv_heads != heads else "none",
        "head_dim": draw(st.sampled_from((4, 8))),
        "embed": 16,
        "seq": draw(st.integers(2, 11)),
        "batch": draw(st.integers(1, 2)),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "key_form": draw(st.sampled_from(KEY_FORMS)),
        "scale": scale,
        "softcap": softcap,
        "mask": draw(st.sampled_from(MASKS)),
        "upcast": draw(st.booleans()),
        "pv": draw(st.sampled_from(PV)),
        # q, k, scores, then P, v, output: the axis orders of einsum_perm's operands and results.
        "perms": [tuple(draw(st.permutations(range(4)))) for _ in range(6)],
        "dtype": draw(st.sampled_from((torch.float32, torch.float32, torch.float64, torch.bfloat16))),
    }


def _build(cfg: dict) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = HandWritten(cfg).to(cfg["dtype"]).eval()
    x = torch.randn(cfg["batch"], cfg["seq"], cfg["embed"], dtype=cfg["dtype"])
    pad = torch.ones(cfg["batch"], cfg["seq"], dtype=torch.long)
    if cfg["seq"] > 2:
        pad[-1, -1] = 0
    return model, (x, pad)


def _reorders_batch(cfg: dict) -> bool:
    """Whether an einsum_perm product writes batch and heads in the other order (then permuted back)."""
    return any(c == "einsum_perm" and p.index(0) > p.index(1)
               for c, p in ((cfg["layout"], cfg["perms"][2]), (cfg["pv"], cfg["perms"][5])))


def _attnrw_ops(ep: torch.export.ExportedProgram) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and "attnrw" in str(n.target))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_handwritten_variants_found_and_exact(cfg: dict) -> None:
    model, args = _build(cfg)
    with torch.no_grad():
        ref = model(*args)
        reports: list[attnrw.Report] = []
        ep = attnrw.rewrite(model, args, report=reports)
        out = ep.module()(*args)
    (report,) = reports
    assert len(report.sites) == 1 and not report.skipped, str(report)
    assert _attnrw_ops(ep) == 1
    site = report.sites[0]
    assert site.num_heads == cfg["heads"] or cfg["layout"] == "folded"
    if cfg["layout"] == "heads" and cfg["gqa"] == "repeat_kv" and not _reorders_batch(cfg):
        # An einsum result in another batch order is carried through reshapes and a permute, behind which
        # the repeat of kv heads is not looked for: such a site is exact with every head's keys.
        assert site.num_kv_heads == cfg["kv_heads"]
    if cfg["mask"] in ("tril_buffer", "causal_where"):
        assert site.causal, site
    if cfg["mask"] in ("none", "additive", "bool_fill", "bias") and cfg["seq"] > 1:
        assert not site.causal, site
    expected_scale = 1.0 if cfg["scale"] in ("none", *TENSOR_SCALES) else 1.0 / math.sqrt(cfg["head_dim"])
    assert site.scale == pytest.approx(expected_scale, rel=1e-6)
    assert site.softcap == pytest.approx(cfg["softcap"], rel=1e-6)
    # softmax(x.float()) on a float64 model is a downcast: the model itself is only fp32-accurate there.
    atol = ATOL[torch.float32] if cfg["upcast"] and cfg["dtype"] == torch.float64 else ATOL[cfg["dtype"]]
    assert (out.double() - ref.double()).abs().max().item() <= atol


# -- near-misses ---------------------------------------------------------------

NEAR_MISSES = (
    "softmax_queries", "query_scale", "key_scale", "score_bias", "fill_zero", "probs_returned", "probs_transposed",
    "talking_heads", "mask_inside_softcap", "softcap_by_tensor", "tanh_twice",
)


class NearMiss(nn.Module):
    """Attention-like code whose rewrite would change the result; it must be left alone."""

    def __init__(self, kind: str, heads: int, dim: int) -> None:
        super().__init__()
        self.kind, self.heads, self.dim = kind, heads, dim
        self.qkv = nn.Linear(16, 3 * heads * dim)
        # Talking heads (Shazeer et al. 2020): the probabilities mixed across heads before P·V.
        self.mix = nn.Parameter(torch.eye(heads) + 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2)
        if self.kind == "query_scale":  # one scale per query row: not constant over the scores
            scores = scores * q.norm(dim=-1, keepdim=True)
        elif self.kind == "key_scale":
            scores = scores * k.norm(dim=-1).unsqueeze(-2)
        else:
            scores = scores / math.sqrt(self.dim)
        if self.kind == "score_bias":
            scores = scores + scores.mean(dim=-1, keepdim=True).exp()
        if self.kind == "fill_zero":
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), 0.0)
        causal = torch.full((s, s), float("-inf")).triu(1)
        if self.kind == "mask_inside_softcap":  # the mask inside the tanh is capped too: not a softcap
            scores = torch.tanh((scores + causal) / 2.0) * 2.0
        elif self.kind == "softcap_by_tensor":  # the factor outside the tanh varies per query
            scores = torch.tanh(scores / 2.0) * q.norm(dim=-1, keepdim=True)
        elif self.kind == "tanh_twice":
            scores = torch.tanh(torch.tanh(scores / 2.0) * 2.0) * 2.0
        probs = scores.softmax(dim=-2 if self.kind == "softmax_queries" else -1)
        if self.kind == "talking_heads":
            probs = torch.einsum("bhqk,hg->bgqk", probs, self.mix)
        if self.kind == "probs_transposed":
            # Pᵀ·V sums over queries, not keys: the shapes fit only because the scores are square.
            out = (probs.transpose(-2, -1) @ v).transpose(1, 2).reshape(b, s, -1)
        else:
            out = (probs @ v).transpose(1, 2).reshape(b, s, -1)
        return (out, probs) if self.kind == "probs_returned" else out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(NEAR_MISSES),
    heads=st.sampled_from((1, 2, 4)),
    dim=st.sampled_from((4, 8)),
    seq=st.integers(2, 9),
)
def test_near_misses_skipped_with_reason_and_untouched(kind: str, heads: int, dim: int, seq: int) -> None:
    torch.manual_seed(0)
    model = NearMiss(kind, heads, dim).eval()
    x = torch.randn(2, seq, 16)
    with torch.no_grad():
        report = attnrw.inspect(model, (x,))
        assert report.sites == []
        assert len(report.skipped) == 1 and report.skipped[0].reason, str(report)
        plain = torch.export.export(model, (x,)).run_decompositions(
            __import__("attnrw.rewriter.trace", fromlist=["keep_sdpa_table"]).keep_sdpa_table()
        )
        ep = attnrw.rewrite(model, (x,))
        assert _attnrw_ops(ep) == 0
        before = [str(n.target) for n in plain.graph.nodes]
        after = [str(n.target) for n in ep.graph.nodes]
        assert before == after
        torch.testing.assert_close(ep.module()(x), model(x))


REASONS = {
    "softmax_queries": "not the last (key) axis",
    "query_scale": "scaled by a tensor that varies over the queries or keys",
    "key_scale": "scaled by a tensor that varies over the queries or keys",
    "score_bias": "depends on the scores",
    "fill_zero": "not a large negative constant",
    "probs_returned": "also used elsewhere",
    "probs_transposed": "over the query axis",
    "talking_heads": "mixed across heads",
    "mask_inside_softcap": "inside the tanh of a softcap",
    "softcap_by_tensor": "scaled by a tensor",
    "tanh_twice": "tanh twice",
}


@pytest.mark.parametrize("kind", NEAR_MISSES)
def test_near_miss_reasons(kind: str) -> None:
    model = NearMiss(kind, 2, 4).eval()
    report = attnrw.inspect(model, (torch.randn(1, 5, 16),))
    assert [s.reason for s in report.skipped] and REASONS[kind] in report.skipped[0].reason, str(report)



class BatchReorderedScores(nn.Module):
    """Q·Kᵀ by einsum into (heads, batch, q, k), permuted back to (batch, heads, q, k): the product's folded
    batch is (heads, batch) and the scores read it reordered."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(16, 3 * 16)
        with torch.no_grad():
            self.qkv.weight.mul_(4.0)  # far from uniform: a batch mix-up would show

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, e = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("bhqd,bhkd->hbqk", q, k).permute(1, 0, 2, 3) / 2.0
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, e)


@pytest.mark.parametrize("heads", [2, 4])
def test_batch_reordered_scores_found_and_exact(heads: int) -> None:
    """Batch 2 and 2 heads: only the chain, not the sizes, tells batch from heads."""
    torch.manual_seed(0)
    model = BatchReorderedScores(heads).eval()
    x = torch.randn(2, 5, 16)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (x,), report=reports)
        assert len(reports[0].sites) == 1 and reports[0].sites[0].num_heads == heads, str(reports[0])
        assert _attnrw_ops(ep) == 1
        torch.testing.assert_close(ep.module()(x), model(x), atol=1e-5, rtol=0)


def test_batch_reordered_scores_with_dynamic_batch_are_skipped_with_the_reason() -> None:
    """With a dynamic batch the reorder cannot be written with static sizes: skipped, said, untouched."""
    torch.manual_seed(0)
    model = BatchReorderedScores(2).eval()
    x = torch.randn(2, 5, 16)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=2, max=8)}},
                            report=reports)
        assert reports[0].sites == [] and "do not compose to its layout" in reports[0].skipped[0].reason, \
            str(reports[0])
        y = torch.randn(3, 5, 16)
        torch.testing.assert_close(ep.module()(y), model(y))


class HeadsFirstMatmul(nn.Module):
    """Q·Kᵀ by ``matmul`` on (heads, batch, ...) operands, the scores permuted back to (batch, heads, ...)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(16, 3 * 16)
        with torch.no_grad():
            self.qkv.weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, e = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q.permute(1, 0, 2, 3) @ k.permute(1, 0, 3, 2)).permute(1, 0, 2, 3) / 2.0
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, e)


@pytest.mark.parametrize("heads,batch", [(2, 2), (4, 2), (2, 3)])
def test_heads_first_matmul_found_and_exact(heads: int, batch: int) -> None:
    torch.manual_seed(0)
    model = HeadsFirstMatmul(heads).eval()
    x = torch.randn(batch, 5, 16)
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ep = attnrw.rewrite(model, (x,), report=reports)
        assert len(reports[0].sites) == 1 and _attnrw_ops(ep) == 1, str(reports[0])
        torch.testing.assert_close(ep.module()(x), model(x), atol=1e-5, rtol=0)
