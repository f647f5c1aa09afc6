"""Every model of the zoo: all sites found, rewritten exactly through torch.export and torch.compile."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import attnrw
from tests.zoo import EXPECTED_SITES, ZOO, outputs_to_tensors

#: fp32 exact rewrites must match the unmodified model this closely (DESIGN.md).
EXACT_ATOL = 1e-5


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _attnrw_ops(ep: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "attnrw" in str(n.target)]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_inspect_finds_every_site(name: str) -> None:
    model, args, kwargs = ZOO[name]()
    report = attnrw.inspect(model, args, kwargs)
    assert len(report.sites) == EXPECTED_SITES[name], str(report)
    assert report.skipped == [], str(report)
    for site in report.sites:
        assert site.num_heads % site.num_kv_heads == 0
        assert site.head_dim > 0 and site.q_len > 0 and site.kv_len > 0


@pytest.mark.parametrize("name", sorted(ZOO))
def test_rewrite_save_load_matches(name: str) -> None:
    model, args, kwargs = ZOO[name]()
    with torch.no_grad():
        ref = outputs_to_tensors(model(*args, **kwargs))
        reports: list[attnrw.Report] = []
        ep = attnrw.rewrite(model, args, kwargs, report=reports)
        ops = _attnrw_ops(ep)
        assert len(ops) == len(reports[0].sites) == EXPECTED_SITES[name]
        assert all(op == "attnrw.attention.default" for op in ops)
        # The matched softmaxes and attention ops are gone from the program.
        assert not any("softmax" in str(n.target) or "scaled_dot_product" in str(n.target) for n in ep.graph.nodes)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded = torch.export.load(buf)
        out = outputs_to_tensors(loaded.module()(*args, **kwargs))
    assert _max_diff(out, ref) <= EXACT_ATOL


@pytest.mark.parametrize("name", sorted(ZOO))
def test_compile_matches_and_sees_same_sites(name: str) -> None:
    model, args, kwargs = ZOO[name]()
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(on_report=reports.append, inner="eager"))
    with torch.no_grad():
        ref = outputs_to_tensors(model(*args, **kwargs))
        out = outputs_to_tensors(compiled(*args, **kwargs))
    assert _max_diff(out, ref) <= EXACT_ATOL
    compiled_sites = [s for r in reports for s in r.sites]
    assert sum(1 for r in reports for d in r.decisions if d.op == "attention") == EXPECTED_SITES[name]
    exported_sites = attnrw.inspect(model, args, kwargs).sites
    assert sorted(s.key() for s in compiled_sites) == sorted(s.key() for s in exported_sites)


def test_rewrite_of_a_model_output_class_warns_nothing() -> None:
    """``attnrw.rewrite`` of a transformers model (a ``ModelOutput`` result) raises no torch-internal warning.

    torch.export warns ``isinstance(treespec, LeafSpec)`` is deprecated from inside itself on such
    outputs; attnrw filters exactly that one (``trace.PYTREE_DEPRECATION``) and nothing else.
    """
    pytest.importorskip("transformers")
    from tests import zoo

    model, args, kwargs = zoo.bert("sdpa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attnrw.rewrite(model, args, kwargs)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
