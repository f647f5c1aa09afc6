"""The public models of :mod:`tests.idiom_models` through export, compile, Sparse and ONNX; inspect on every model.

Each model carries one idiom the matcher once missed (issue 14's families).
Per model: every softmax is found; the Dense rewrite equals the unmodified
model through ``attnrw.rewrite`` (traced at one length, run at another) and
through ``torch.compile``; Sparse is applied exactly where the site is proven
self-attention and kept dense with a reason elsewhere; the ONNX export runs
in onnxruntime and matches (or, where a plain export of the unmodified model
fails too, the error says the limit is the exporter's).

Exactness is checked in float64, where an exact rewrite agrees to 1e-9
(``Spec.atol``; 1e-5 where the model itself takes the softmax in float32): with attention as sharp as these models are made (see
:mod:`tests.idiom_models`) the float32 models are themselves only ~1e-5
accurate, so a float32 comparison could not tell a wrong rewrite from
rounding. ONNX runs in float32, bounded by ``to_onnx``'s own verification.
"""

from __future__ import annotations

import json

import pytest
import torch

import attnrw
from attnrw.errors import ExporterLimitError
from attnrw.export import dynamic_seq_shapes, to_onnx
from attnrw.patterns.graph import SOFTMAX
from attnrw.patterns.sdpa import SDPA_OPS
from attnrw.rewriter.trace import export_program
from tests.export.sites import onnx_ops
from tests.idiom_models import IDIOM_MODELS, SPECS, text_inputs
from tests.zoo import ZOO, outputs_to_tensors

pytest.importorskip("transformers")

#: A rewrite that changed attention moves these sharpened models by far more than this.
CHANGED = 1e-3
#: Mean top probability of every softmax, above which attention is far from uniform (1/12 for 12 keys).
SHARP = 0.3
#: The length the dynamic programs run at, other than the traced SEQ = 12.
OTHER_SEQ = 17

MODELS = sorted(IDIOM_MODELS)


def _build(name: str, dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, tuple, dict]:
    model, args, kwargs = IDIOM_MODELS[name]()
    cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    return model.to(dtype), tuple(a.to(dtype) for a in args), cast


def _first(out: object) -> torch.Tensor:
    return outputs_to_tensors(out)[0]


class _TopProbability(torch.fx.Interpreter):
    """Runs a program, recording the mean largest probability of every softmax."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.tops: list[float] = []

    def run_node(self, n: torch.fx.Node) -> object:
        out = super().run_node(n)
        if n.op == "call_function" and n.target in SOFTMAX:
            self.tops.append(out.amax(-1).mean().item())
        return out


@pytest.mark.parametrize("name", MODELS)
def test_attention_is_far_from_uniform(name: str) -> None:
    """The premise of every equality below: these models' attention is sharp (see tests/idiom_models.py)."""
    model, args, kwargs = _build(name)
    program = export_program(model, args, kwargs)
    interp = _TopProbability(program.module())
    with torch.no_grad():
        interp.run(*torch.utils._pytree.tree_leaves(program.example_inputs))
    assert interp.tops and min(interp.tops) > SHARP, interp.tops


@pytest.mark.parametrize("name", MODELS)
def test_found_and_dense_exact(name: str) -> None:
    """Every softmax is a site; the Dense program equals the model at the traced length and another one."""
    spec = SPECS[name]
    model, args, kwargs = _build(name)
    dynamic = spec.dynamic
    reports: list[attnrw.Report] = []
    program = attnrw.rewrite(model, args, kwargs, report=reports,
                             dynamic_shapes=dynamic_seq_shapes(model, args, kwargs) if dynamic else None)
    (report,) = reports
    assert len(report.sites) == spec.sites and not report.skipped, str(report)
    assert [d.op for d in report.decisions] == ["attention"] * spec.sites, str(report)
    lengths = [kwargs] + ([{**kwargs, **text_inputs(pad=3, seq=OTHER_SEQ)}] if dynamic else [])
    with torch.no_grad():
        for inputs in lengths:
            torch.testing.assert_close(_first(program.module()(*args, **inputs)), _first(model(*args, **inputs)),
                                       atol=spec.atol, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_found_and_dense_exact_under_compile(name: str) -> None:
    model, args, kwargs = _build(name)
    seen: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(attnrw.Dense(), on_report=seen.append, inner="eager"))
    with torch.no_grad():
        torch.testing.assert_close(_first(compiled(*args, **kwargs)), _first(model(*args, **kwargs)),
                                   atol=SPECS[name].atol, rtol=0)
    assert sum(len(r.sites) for r in seen) == SPECS[name].sites, "\n".join(map(str, seen))
    assert all(not r.skipped for r in seen), "\n".join(map(str, seen))


@pytest.mark.parametrize("name", MODELS)
def test_sparse_applied_where_aligned(name: str) -> None:
    """Sparse lowers the proven self-attention sites only, each with a reason where it does not.

    A window that covers every key leaves the model's value unchanged (the
    window is placed on the right axis and nothing else moved); a window of
    2 changes it (the window is honoured).
    """
    spec = SPECS[name]
    model, args, kwargs = _build(name)
    with torch.no_grad():
        eager = _first(model(*args, **kwargs))
        for window, same in ((4 * 64, True), (2, False)):
            reports: list[attnrw.Report] = []
            program = attnrw.rewrite(model, args, kwargs, policy=attnrw.Sparse(window=window, sinks=0), report=reports)
            (report,) = reports
            ops = [d.op for d in report.decisions]
            assert ops.count("sparse_attention") == spec.aligned, str(report)
            for site, decision in zip(report.sites, report.decisions):
                assert (decision.op == "sparse_attention") == site.self_attention, str(report)
                assert decision.op == "sparse_attention" or "kept dense" in decision.note, str(report)
            error = (_first(program.module()(*args, **kwargs)) - eager).abs().max().item()
            assert error <= spec.atol if same else error > CHANGED, (window, error)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_exports_and_matches(tmp_path, name: str) -> None:
    """Dense (and Sparse where a site takes it) verified in onnxruntime by ``to_onnx`` against PyTorch.

    Where the exporter cannot take the model with its padding mask (a plain
    export fails too), ``to_onnx`` says so, and the model without the mask
    exports.
    """
    pytest.importorskip("onnxruntime")
    spec = SPECS[name]
    model, args, kwargs = _build(name, torch.float32)
    if spec.onnx == "exporter-limit":
        with pytest.raises(ExporterLimitError, match="a plain torch.onnx.export of the unmodified model .* fails too"):
            to_onnx(model, args, tmp_path / "masked.onnx", kwargs=kwargs)
        assert not (tmp_path / "masked.onnx").exists()
        kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    path = to_onnx(model, args, tmp_path / "dense.onnx", kwargs=kwargs)
    ops = onnx_ops(path)
    assert ops.count("Attention") == spec.sites, ops
    if spec.aligned:
        to_onnx(model, args, tmp_path / "sparse.onnx", kwargs=kwargs, policy=attnrw.Sparse(window=4, sinks=1))


INSPECTED = [f"tests.zoo:{n}" for n in sorted(ZOO)] + [f"tests.idiom_models:{n}" for n in [*MODELS, "near_misses"]]


@pytest.mark.parametrize("spec", INSPECTED)
def test_inspect_lists_every_softmax(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                     spec: str) -> None:
    """``attnrw inspect`` accounts for every softmax and SDPA call: a site, or skipped with its reason.

    The candidates are counted in the very program the command traced (kept
    by wrapping ``export_program``), so the model is exported once.
    """
    from attnrw import cli
    from attnrw.rewriter import api

    traced: list[torch.export.ExportedProgram] = []

    def keep(*a: object, **k: object) -> torch.export.ExportedProgram:
        traced.append(export_program(*a, **k))
        return traced[-1]

    monkeypatch.setattr(api, "export_program", keep)
    assert cli.main(["inspect", spec, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    (program,) = traced
    candidates = [n.name for n in program.graph.nodes
                  if n.op == "call_function" and (n.target in SOFTMAX or n.target in SDPA_OPS)]
    listed = [s["node"] for s in found["sites"]] + [s["node"] for s in found["skipped"]]
    assert candidates and sorted(listed) == sorted(candidates), (listed, candidates)
    assert all(s["reason"].strip() for s in found["skipped"]), found["skipped"]
    if found["skipped"]:
        assert cli.main(["inspect", spec]) == 0
        text = capsys.readouterr().out
        for s in found["skipped"]:
            assert s["node"] in text and s["reason"] in text, text


def test_near_misses_name_what_stops_them(capsys: pytest.CaptureFixture[str]) -> None:
    """The two non-attention softmaxes of NearMisses, each with a reason that says what is in the way."""
    from attnrw import cli

    assert cli.main(["inspect", "tests.idiom_models:near_misses", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found["sites"]) == 1, found
    reasons = sorted(s["reason"] for s in found["skipped"])
    assert len(reasons) == 2 and any("mixed across heads" in r for r in reasons), reasons
