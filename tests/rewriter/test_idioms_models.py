"""Public models with the idioms of tests/patterns/test_idioms.py, built from configs (random weights, no download).

Weights are scaled so that a wrong rewrite shows: Swin-v2's per-head
``logit_scale`` is raised to log(50) (cosine scores in [-50, 50]); Funnel's
and XLNet's q/k projections are multiplied by 4. Each test checks that every
softmax is found and the Dense rewrite is exact through export and compile.

The models run in float64: with attention this peaked the float32 model is
itself only about 1e-5 accurate (Swin-v2 at logit scale 50 differs from its
float64 self by 7e-5), so a float32 comparison could not tell a wrong
rewrite from rounding. In float64 an exact rewrite agrees to ``ATOL``.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnrw

ATOL = 1e-9


def _check(model: torch.nn.Module, kwargs: dict, sites: int) -> None:
    with torch.no_grad():
        ref = model(**kwargs)[0]
        reports: list[attnrw.Report] = []
        ep = attnrw.rewrite(model, (), kwargs, report=reports)
        assert len(reports[0].sites) == sites and not reports[0].skipped, str(reports[0])
        assert sum("attnrw" in str(n.target) for n in ep.graph.nodes if n.op == "call_function") == sites
        torch.testing.assert_close(ep.module()(**kwargs)[0], ref, atol=ATOL, rtol=0)
        seen: list[attnrw.Report] = []
        compiled = torch.compile(model, backend=attnrw.backend(attnrw.Dense(), on_report=seen.append, inner="eager"))
        torch.testing.assert_close(compiled(**kwargs)[0], ref, atol=ATOL, rtol=0)
    assert sum(len(r.sites) for r in seen) == sites and all(not r.skipped for r in seen), "\n".join(map(str, seen))


def _scale_qk(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.endswith(n) for n in names):
                p.mul_(4.0)


def test_swinv2_cosine_attention() -> None:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Swinv2Model"):
        pytest.skip("transformers has no Swinv2Model")
    cfg = transformers.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                    window_size=4)
    torch.manual_seed(0)
    model = transformers.Swinv2Model(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(math.log(50.0))
    _check(model, {"pixel_values": torch.randn(2, 3, 32, 32, dtype=torch.float64)}, sites=4)
