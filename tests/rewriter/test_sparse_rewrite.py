"""The Sparse policy on real models: which sites it applies to, exactness where it must be exact."""

from __future__ import annotations

import io

import pytest
import torch

import attnrw
from tests.zoo import ZOO, outputs_to_tensors


def _run(model, args, kwargs, policy) -> tuple[list[torch.Tensor], list[attnrw.Report]]:
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(policy, on_report=reports.append, inner="eager"))
    with torch.no_grad():
        return outputs_to_tensors(compiled(*args, **kwargs)), reports


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["mistral_eager", "mistral_sdpa"])
def test_sparse_with_the_models_own_window_is_exact(name: str) -> None:
    model, args, kwargs = ZOO[name]()
    window = model.config.sliding_window
    assert args == () and kwargs["input_ids"].shape[1] > window, "the zoo's Mistral must use its window"
    with torch.no_grad():
        ref = outputs_to_tensors(model(*args, **kwargs))
    out, reports = _run(model, args, kwargs, attnrw.Sparse(window=window, sinks=0))
    assert [d.op for r in reports for d in r.decisions] == ["sparse_attention"] * 2
    assert _diff(out, ref) <= 1e-5


@pytest.mark.parametrize("name", ["llama_eager", "gpt2_sdpa", "bert_eager", "vit_sdpa"])
def test_window_covering_the_sequence_is_dense(name: str) -> None:
    model, args, kwargs = ZOO[name]()
    with torch.no_grad():
        ref = outputs_to_tensors(model(*args, **kwargs))
    out, reports = _run(model, args, kwargs, attnrw.Sparse(window=1024, sinks=1, block_size=4))
    ops = [d.op for r in reports for d in r.decisions]
    assert ops and set(ops) == {"sparse_attention"}
    assert _diff(out, ref) <= 1e-5


@pytest.mark.parametrize("name", ["llama_eager", "gpt2_sdpa", "bert_eager", "vit_sdpa"])
def test_options_sparse_runs_and_export_agrees(name: str) -> None:
    model, args, kwargs = ZOO[name]()
    options = {"policy": "sparse", "window": 4, "sinks": 1, "topk": 1, "block_size": 4, "inner": "eager"}
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend="attnrw", options={**options, "on_report": reports.append})
    with torch.no_grad():
        ref = outputs_to_tensors(model(*args, **kwargs))
        out = outputs_to_tensors(compiled(*args, **kwargs))
        policy = attnrw.Sparse(window=4, sinks=1, topk=1, block_size=4)
        ep = attnrw.rewrite(model, args, kwargs, policy=policy)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded = torch.export.load(buf).module()(*args, **kwargs)
    assert [d.op for r in reports for d in r.decisions] == ["sparse_attention"] * 2
    assert sum(1 for n in ep.graph.nodes if n.target is torch.ops.attnrw.sparse_attention.default) == 2
    assert all(torch.isfinite(t).all() for t in out)
    assert _diff(out, ref) > 1e-4, "a 4-token window on longer sequences must change the result"
    assert _diff(outputs_to_tensors(loaded), out) <= 1e-5


def test_cross_attention_stays_dense_and_is_reported() -> None:
    model, args, kwargs = ZOO["t5_eager"]()
    out, reports = _run(model, args, kwargs, attnrw.Sparse(window=4))
    decisions = [d for r in reports for d in r.decisions]
    cross = [d for d in decisions if "cross" in d.module_path.lower() or "EncDecAttention" in d.module_path]
    assert cross and all(d.op == "attention" and "not applicable" in d.note for d in cross)
    assert sum(d.op == "sparse_attention" for d in decisions) == 4


def test_policy_dict_mixes_sparse_and_dense() -> None:
    model, args, kwargs = ZOO["llama_eager"]()
    spec = {"layers.0.*": attnrw.Sparse(window=2), "*": attnrw.Dense()}
    _, reports = _run(model, args, kwargs, spec)
    assert [(d.module_path, d.op) for r in reports for d in r.decisions] == [
        ("layers.0.self_attn", "sparse_attention"),
        ("layers.1.self_attn", "attention"),
    ]
