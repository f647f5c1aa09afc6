"""PyTorch's fused inference fast paths are decomposed so torch.compile sees the same sites as torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnrw


class SelfMHA(nn.Module):
    """Self-attention through ``nn.MultiheadAttention``: in eval + no_grad it takes ``_native_multi_head_attention``."""

    def __init__(self, mask_kind: str) -> None:
        super().__init__()
        self.mask_kind = mask_kind
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if self.mask_kind == "padding":
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("mask_kind", ["none", "padding"])
def test_native_mha_fast_path(mask_kind: str) -> None:
    torch.manual_seed(0)
    model = SelfMHA(mask_kind).eval()
    x = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ref = model(x, pad)
        out = torch.compile(model, backend=attnrw.backend(on_report=reports.append, inner="eager"))(x, pad)
    assert (out - ref).abs().max().item() <= 1e-5
    (report,) = reports
    assert [d.op for d in report.decisions] == ["attention"], str(report)
    assert report.sites[0].module_path == "mha"
    assert report.sites[0].num_heads == 4
    exported = attnrw.inspect(model, (x, pad)).sites
    assert [s.key() for s in exported] == [s.key() for s in report.sites]


def test_rewrite_accepts_an_exported_program() -> None:
    torch.manual_seed(0)
    model = SelfMHA("padding").eval()
    x, pad = torch.randn(2, 7, 32), torch.zeros(2, 7, dtype=torch.bool)
    ep = torch.export.export(model, (x, pad))
    out = attnrw.rewrite(ep, (x, pad))
    assert sum(1 for n in out.graph.nodes if n.target is torch.ops.attnrw.attention.default) == 1
    with torch.no_grad():
        assert (out.module()(x, pad) - model(x, pad)).abs().max().item() <= 1e-5
    with pytest.raises(attnrw.ConfigError, match="already exported"):
        attnrw.rewrite(ep, (x, pad), dynamic_shapes={"x": {1: torch.export.Dim("s")}})


def test_bad_model_and_args_are_typed_errors() -> None:
    with pytest.raises(attnrw.ConfigError, match="nn.Module or a torch.export.ExportedProgram"):
        attnrw.inspect(lambda x: x, (torch.randn(2),))
    with pytest.raises(attnrw.ConfigError, match="tuple of example inputs"):
        attnrw.inspect(SelfMHA("none"), torch.randn(2, 7, 32))
    with pytest.raises(attnrw.ConfigError, match="policy"):
        attnrw.rewrite(SelfMHA("none"), (torch.randn(2, 7, 32), torch.zeros(2, 7, dtype=torch.bool)), policy=3)


@pytest.mark.parametrize("mask_type", [None, 0, 1])
def test_native_mha_decomposition_matches_the_fused_op(mask_type: int | None) -> None:
    """The decomposition used when the fast path shows up in a trace computes what the fused op does."""
    from attnrw.rewriter.fused import FUSED_DECOMPOSITIONS

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    mask = None
    if mask_type == 0:
        mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    elif mask_type == 1:
        mask = torch.zeros(2, 7, dtype=torch.bool)
        mask[1, -2:] = True
    args = (x, x, x, 32, 4, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias,
            mask, False, True, mask_type)
    with torch.no_grad():
        ref = torch.ops.aten._native_multi_head_attention.default(*args)[0]
        out = FUSED_DECOMPOSITIONS[torch.ops.aten._native_multi_head_attention.default](*args)[0]
    assert (out - ref).abs().max().item() <= 1e-5
