"""Sparse and Condense keep 4 attention sinks unless told otherwise, in every way a policy is spelled.

Why 4 (StreamingLLM; measured on SmolLM2-135M at 2048 tokens, Sparse(window=256)):
perplexity 19.7 dense, 36.0 without sinks, 21.4 with 4. See the Sparse docstring.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnrw
from attnrw import cli
from attnrw.cli_flags import policy_from_flags
from attnrw.kernels.sparse import sparse_attention_torch
from attnrw.policies import get_policy

SPELLINGS = {
    "sparse": ({"window": 8}, ["--window", "8"]),
    "condense": ({"recent": 8, "group": 4}, ["--recent", "8", "--group", "4"]),
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_spelling_defaults_to_four_sinks(name: str) -> None:
    fields, flags = SPELLINGS[name]
    python = get_policy(name)(**fields)
    options, _ = attnrw.parse_options({"policy": name, **fields})
    ns = cli.build_parser().parse_args(["rewrite", "m.pt2", "-o", "x.pt2", "--policy", name, *flags])
    assert python.sinks == options.sinks == policy_from_flags(ns).sinks == 4
    explicit = cli.build_parser().parse_args(["rewrite", "m.pt2", "-o", "x.pt2", "--policy", name, *flags,
                                              "--sinks", "0"])
    assert policy_from_flags(explicit).sinks == 0


class CausalSDPA(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_default_sparse_rewrite_sees_the_first_four_keys() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    out = attnrw.rewrite(CausalSDPA().eval(), (q, k, v), policy=attnrw.Sparse(window=4)).module()(q, k, v)
    scale = 16 ** -0.5
    with_sinks = sparse_attention_torch(q, k, v, None, True, scale, 4, 4, 0, 64)
    without = sparse_attention_torch(q, k, v, None, True, scale, 4, 0, 0, 64)
    torch.testing.assert_close(out, with_sinks, atol=1e-5, rtol=0)
    assert (out - without).abs().max().item() > 1e-3, "four sinks must change the rows past the window"
