"""``Policy.cost``: the attention FLOPs a rewrite computes as a fraction of dense, checked against what runs.

The oracle is the rewritten graph itself: the keys a sparse query sees
(counted from the kernel's own mask rule), and, for ``Merge(mode="tokens")``,
the token counts of the ``tokens_attention`` nodes the pass emitted.
"""

from __future__ import annotations

import pytest
import torch

import attnrw
from attnrw.policies import dense_flops
from tests.zoo import ZOO


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_cost_counts_the_keys_a_query_sees(causal: bool) -> None:
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    s, window, sinks = 96, 16, 4
    q = torch.randn(1, 2, s, 8)
    reports: list[attnrw.Report] = []
    attnrw.rewrite(Attn(), (q, q, q), policy=attnrw.Sparse(window=window, sinks=sinks), report=reports)
    (d,) = reports[0].decisions
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    band = (j <= i) & (j > i - window) if causal else (i - j).abs() <= window // 2
    seen = band | ((j < sinks) & ((j <= i) if causal else True))
    dense = ((j <= i) if causal else torch.ones(s, s, dtype=torch.bool)).sum()
    # The cost counts a full band and the sinks for every query: an upper bound on the keys seen,
    # above them only by the queries near the ends (fewer band keys) and the sinks inside the band.
    exact = float(seen.sum()) / float(dense)
    assert exact <= d.cost <= 1.15 * exact


def test_tokens_mode_cost_follows_the_tokens_each_site_receives() -> None:
    model, args, kwargs = ZOO["bert_eager"]()
    n = kwargs["input_ids"].shape[1]
    policy = attnrw.Merge(ratio=0.25, mode="tokens")
    reports: list[attnrw.Report] = []
    ep = attnrw.rewrite(model, args, kwargs, policy=policy, report=reports)
    counts = [node.meta["val"][0].shape[2] for node in ep.graph.nodes
              if node.target is torch.ops.attnrw.tokens_attention.default]
    decisions = reports[0].decisions
    assert len(counts) == len(decisions) >= 2
    for d, site, t in zip(decisions, reports[0].sites, counts):
        assert d.cost == pytest.approx((t / n) ** 2)
        assert dense_flops(site) * d.cost < dense_flops(site)
    assert decisions[-1].cost < decisions[0].cost  # reductions compound
