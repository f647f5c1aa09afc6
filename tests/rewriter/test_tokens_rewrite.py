"""``Merge(mode="tokens")`` on models: the merged tokens are carried through the layers after each site."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnrw
from attnrw.kernels.merge.plan import exact_count
from attnrw.rewriter.tokens import _map_view
from tests.zoo import ZOO, outputs_to_tensors

transformers = pytest.importorskip("transformers")


def _bert_without_positions(attn: str) -> nn.Module:
    """A 3-layer BERT with zero position embeddings: equal input ids give equal hidden states in every layer."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
    return model


def _repeated_ids() -> dict[str, torch.Tensor]:
    """[CLS] then 7 distinct ids, each 4 times in a row, then 3 more; the last 3 of row 1 are padding."""
    rows = [[1] + [t for t in range(base, base + 7) for _ in range(4)] + [2] * 3 for base in (5, 20)]
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_merging_equal_tokens_is_exact(attn: str) -> None:
    """Tokens that are equal in every layer merge with no error: the carried model equals the dense one.

    32 tokens, ratio 0.25 per site: 24, 18, 13 tokens attend. Each merge
    joins equal tokens (cosine 1 ranks first), so sizes, the log(size) bias
    and the averaged residual reproduce the dense result exactly on real tokens.
    """
    model = _bert_without_positions(attn)
    kw = _repeated_ids()
    with torch.no_grad():
        ref = model(**kw).last_hidden_state
    reports: list[attnrw.Report] = []
    ep = attnrw.rewrite(model, (), kw, policy=attnrw.Merge(ratio=0.25, mode="tokens"), report=reports)
    calls = [n for n in ep.graph.nodes if n.target is torch.ops.attnrw.tokens_attention.default]
    assert [c.meta["val"][0].shape[2] for c in calls] == [24, 18, 13]
    with torch.no_grad():
        out = ep.module()(**kw).last_hidden_state
    assert out.shape == ref.shape
    real = kw["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    notes = [d.note for d in reports[0].decisions]
    assert all("carried through" in n for n in notes) and "graph output" in notes[-1]


def _compile(name: str, options: dict, dynamic: bool | None = None):
    model, args, kwargs = ZOO[name]()
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend="attnrw", dynamic=dynamic,
                             options={**options, "inner": "eager", "on_report": reports.append})
    with torch.no_grad():
        return model, args, kwargs, outputs_to_tensors(compiled(*args, **kwargs)), reports


@pytest.mark.parametrize("name", ["bert_sdpa", "vit_eager", "clip_vision_sdpa"])
def test_compiled_models_carry_tokens(name: str) -> None:
    """torch.compile carries the tokens in BERT, ViT and CLIP; the result is the exported rewrite's."""
    policy = {"policy": "merge", "ratio": 0.25, "mode": "tokens"}
    model, args, kwargs, out, reports = _compile(name, policy)
    decisions = [d for r in reports for d in r.decisions]
    assert decisions and all(d.op == "tokens_attention" for d in decisions), [d.note for d in decisions]
    ep = attnrw.rewrite(model, args, kwargs, policy=attnrw.Merge(ratio=0.25, mode="tokens"))
    counts = [n.meta["val"][0].shape[2] for n in ep.graph.nodes if n.target is torch.ops.attnrw.tokens_attention.default]
    t = kwargs["input_ids"].shape[1] if name.startswith("bert") else 17  # 16 patches + the class token
    for c in counts:  # reductions compound: each site merges its share of the tokens it receives
        assert c == t - exact_count(t, 0.25, -1, 1)
        t = c
    with torch.no_grad():
        again = outputs_to_tensors(ep.module()(*args, **kwargs))
    with torch.no_grad():
        dense = outputs_to_tensors(model(*args, **kwargs))
    for a, b, d in zip(out, again, dense):
        assert a.shape == d.shape and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class _MixAfterAttention(nn.Module):
    """Self-attention whose output goes straight into a cumulative sum over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).cumsum(2)


def test_a_site_followed_by_a_token_mixing_op_falls_back_to_qkv() -> None:
    model = _MixAfterAttention().eval()
    x = torch.randn(2, 12, 16)
    reports: list[attnrw.Report] = []
    ep = attnrw.rewrite(model, (x,), policy=attnrw.Merge(ratio=0.25, mode="tokens"), report=reports)
    (d,) = reports[0].decisions
    assert d.op == "merged_attention" and "fell back to qkv" in d.note and "cumsum" in d.note
    targets = {n.target for n in ep.graph.nodes}
    assert torch.ops.attnrw.tokens_attention.default not in targets
    qkv = attnrw.rewrite(model, (x,), policy=attnrw.Merge(ratio=0.25, mode="qkv"))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), qkv.module()(x))


def test_dynamic_shapes_fall_back_to_qkv_with_a_note() -> None:
    _, _, _, out, reports = _compile("vit_sdpa", {"policy": "merge", "ratio": 0.25, "mode": "tokens"}, dynamic=True)
    decisions = [d for r in reports for d in r.decisions]
    assert decisions and all(d.op == "merged_attention" and "static shapes" in d.note for d in decisions)
    assert all(torch.isfinite(t).all() for t in out)


def test_cross_attention_sites_merge_keys_only() -> None:
    model, args, kwargs = ZOO["mha_cross_batch_first"]()
    reports: list[attnrw.Report] = []
    attnrw.rewrite(model, args, kwargs, policy=attnrw.Merge(ratio=0.25, mode="tokens"), report=reports)
    (d,) = reports[0].decisions
    assert d.op == "merged_attention" and "keys/values only" in d.note


@pytest.mark.parametrize(
    "old_in, tok, batch, old_out, want",
    [
        ([2, 12, 32], 1, 0, [24, 32], (0, 0)),  # fold batch and tokens for a linear layer
        ([24, 32], 0, 0, [2, 12, 32], (1, 0)),  # and back
        ([2, 12, 32], 1, 0, [2, 12, 2, 16], (1, 0)),  # split the features into heads
        ([2, 2, 12, 16], 2, 0, [4, 12, 16], (1, 0)),  # batch × heads, batch-major
        ([4, 12, 16], 1, 0, [2, 2, 12, 16], (2, 0)),
        ([2, 12, 32], 1, 0, [2, 12, -1], (1, 0)),
        ([2, 12, 32], 1, 0, [2, 384], None),  # tokens folded with features
        ([2, 12, 32], 1, 0, [2, 3, 4, 32], None),  # the token axis split (windows)
        ([2, 2, 12, 16], 2, 0, [2, 24, 16], None),  # heads folded with the tokens
        ([1, 12, 32], 1, 0, [12, 32], (0, 0)),  # a batch of one
    ],
)
def test_views_that_keep_tokens_whole(old_in, tok, batch, old_out, want) -> None:
    assert _map_view(old_in, tok, batch, old_out, 12, 1 if old_in[0] == 1 else 2) == want


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_runs_in_tokens_mode(name: str) -> None:
    """On every model: ratio 0 equals the unmodified model; ratio 0.25 keeps every output's shape, finite.

    Sites that cannot carry tokens (causal, cross-attention, a token-mixing
    op right after) keep their other lowering; values leaving a region are
    restored in the memory layout the code after them was traced with.
    """
    model, args, kwargs = ZOO[name]()
    with torch.no_grad():
        ref = outputs_to_tensors(model(*args, **kwargs))
    for ratio in (0.0, 0.25):
        ep = attnrw.rewrite(model, args, kwargs, policy=attnrw.Merge(ratio=ratio, mode="tokens"))
        with torch.no_grad():
            out = outputs_to_tensors(ep.module()(*args, **kwargs))
        assert [o.shape for o in out] == [r.shape for r in ref]
        if ratio == 0.0:
            for o, r in zip(out, ref):
                torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
        else:
            assert all(torch.isfinite(o).all() for o in out if o.is_floating_point())
