"""The Merge policy on real models: exact at ratio 0 in every mode, causal sites kept dense, schedules."""

from __future__ import annotations

import io

import pytest
import torch

import attnrw
from tests.zoo import ZOO, outputs_to_tensors


def _compile(name: str, options: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], list[attnrw.Report]]:
    model, args, kwargs = ZOO[name]()
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend="attnrw", options={**options, "inner": "eager", "on_report": reports.append})
    with torch.no_grad():
        return outputs_to_tensors(model(*args, **kwargs)), outputs_to_tensors(compiled(*args, **kwargs)), reports


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["kv", "qkv", "tokens"])
@pytest.mark.parametrize("name", ["bert_eager", "vit_sdpa", "clip_vision_eager"])
def test_ratio_zero_is_dense(name: str, mode: str) -> None:
    ref, out, reports = _compile(name, {"policy": "merge", "ratio": 0.0, "mode": mode})
    decisions = [d for r in reports for d in r.decisions]
    want = "tokens_attention" if mode == "tokens" else "merged_attention"
    assert decisions and all(d.op == want for d in decisions)
    if mode == "tokens":
        assert all("carried through" in d.note for d in decisions)
    assert _diff(out, ref) <= 1e-5


@pytest.mark.parametrize("mode", ["kv", "qkv"])
def test_merging_changes_the_result_but_stays_close(mode: str) -> None:
    ref, out, _ = _compile("vit_sdpa", {"policy": "merge", "ratio": 0.5, "mode": mode})
    assert 1e-6 < _diff(out, ref) < 1.0
    assert all(torch.isfinite(t).all() for t in out)


def test_causal_sites_stay_dense() -> None:
    ref, out, reports = _compile("gpt2_eager", {"policy": "merge", "ratio": 0.5})
    decisions = [d for r in reports for d in r.decisions]
    assert all(d.op == "attention" and "causal" in d.note for d in decisions)
    assert _diff(out, ref) <= 1e-5


def test_schedule_per_site_and_saved_program() -> None:
    model, args, kwargs = ZOO["bert_eager"]()
    policy = attnrw.Merge(ratio=[0.0, 0.5], mode="kv")
    ep = attnrw.rewrite(model, args, kwargs, policy=policy)
    calls = [n for n in ep.graph.nodes if n.target is torch.ops.attnrw.merged_attention.default]
    assert [c.args[6] for c in calls] == [0.0, 0.5]
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    with torch.no_grad():
        a = outputs_to_tensors(torch.export.load(buf).module()(*args, **kwargs))
        b = outputs_to_tensors(ep.module()(*args, **kwargs))
    assert _diff(a, b) == 0.0
    with pytest.raises(attnrw.ConfigError, match="one value per site"):
        attnrw.rewrite(model, args, kwargs, policy=attnrw.Merge(ratio=[0.1], mode="kv"))
