"""A site has one name, whatever way the model comes in.

For every zoo model a plan is calibrated through ``attnrw.calibrate`` (which
exports the model) and saved; it is then applied under ``torch.compile(model)``,
``model.forward = torch.compile(model.forward)`` and ``model.compile()``. A
plan names sites by module path, so it only applies when each way names
them as export does (a mismatch raises ``PlanError``). The plan's lossy
candidate makes the ways comparable on outputs too: they agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnrw
from attnrw.patterns.graph import normalize_module_path
from tests.zoo import EXPECTED_SITES, ZOO, outputs_to_tensors

#: Outputs of two ways in that run the same ops on the same inputs.
SAME_ATOL = 1e-5
CANDIDATE = attnrw.Sparse(window=4, sinks=1)


def _compile(way: str, model: torch.nn.Module, options: dict) -> torch.nn.Module:
    if way == "torch.compile(model)":
        return torch.compile(model, backend="attnrw", options=options)
    if way == "model.forward = torch.compile(model.forward)":
        model.forward = torch.compile(model.forward, backend="attnrw", options=options)
        return model
    model.compile(backend="attnrw", options=options)
    return model


WAYS = ("torch.compile(model)", "model.forward = torch.compile(model.forward)", "model.compile()")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_way_in_names_sites_alike_and_applies_a_plan(name: str, tmp_path: Path) -> None:
    model, args, kwargs = ZOO[name]()
    # A budget every candidate meets: each site where the candidate applies gets it.
    auto = attnrw.Auto(budget=1e9, candidates=(CANDIDATE,))
    plan = attnrw.calibrate(model, (args, kwargs), policy=auto)  # through torch.export
    path = plan.save(tmp_path / "plan.json")
    names = sorted(e.site.split("#")[0] for e in plan.entries)
    assert len(names) == EXPECTED_SITES[name]
    first: list[torch.Tensor] | None = None
    for way in WAYS:
        torch._dynamo.reset()
        model, args, kwargs = ZOO[name]()
        reports: list[attnrw.Report] = []
        compiled = _compile(way, model, {"plan": str(path), "inner": "eager", "on_report": reports.append})
        with torch.no_grad():
            got = outputs_to_tensors(compiled(*args, **kwargs))
        if way == "model.compile()" and type(model).__module__.startswith("torch.nn"):
            # Dynamo does not start a frame inside torch.nn, so Module.compile()
            # of a built-in module compiles nothing: no graph reaches any backend.
            assert reports == []
            continue
        assert sorted(s.module_path for r in reports for s in r.sites) == names, way
        assert any(d.op == "sparse_attention" for r in reports for d in r.decisions) == any(
            e.policy == CANDIDATE for e in plan.entries
        )
        if first is None:
            first = got
        for g, w in zip(got, first, strict=True):
            torch.testing.assert_close(g, w, atol=SAME_ATOL, rtol=0, msg=way)


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("L['self'].encoder.layer[3]._modules['attn']", "encoder.layer.3.attn"),
        ("L['args'][0].layers.0.self_attn", "layers.0.self_attn"),
        ("L['kwargs']['model'].h.1.attn", "h.1.attn"),
        ("L['fn'].__self__.blocks.2", "blocks.2"),
        ("L['model'].decoder.layers[1].self_attn", "decoder.layers.1.self_attn"),
        ("G['net'].layers[0]", "layers.0"),
        ("getattr(getattr(L['self'], 'layers'), '0').attn", "layers.0.attn"),
        ("L['self'][0].attn", "0.attn"),  # a root Sequential: its first child stays "0"
        ("layers.0.self_attn", "layers.0.self_attn"),  # torch.export's paths are already relative
        ("L['self']", ""),
    ],
)
def test_dynamo_sources_name_the_path_inside_the_model(raw: str, path: str) -> None:
    assert normalize_module_path(raw) == path
