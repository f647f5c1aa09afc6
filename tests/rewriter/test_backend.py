"""The torch.compile backend: options, reports, gradients, dynamic shapes, Inductor."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import attnrw
from attnrw.config import BackendSettings, parse_options
from attnrw.policies import Dense, Sparse
from tests.zoo import ZOO, outputs_to_tensors

#: Gradients through the rewritten model vs the unmodified one (issue acceptance).
GRAD_ATOL = 1e-4


def _loss(outputs: object) -> torch.Tensor:
    """A mean-squared loss over every output, as a training loss would be (a mean, not a sum)."""
    return sum(t.float().pow(2).mean() for t in outputs_to_tensors(outputs))


def _assert_grads_close(
    got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], exact: dict[str, torch.Tensor] | None = None
) -> None:
    """Within GRAD_ATOL of the unmodified model, and (given float64 gradients) no less accurate than it."""
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=GRAD_ATOL, rtol=1e-4, msg=n)
        if exact is not None:
            truth = exact[n].double()
            # fp32 rounding in a deep model reaches ~1e-4 relative on its own;
            # the rewrite must not add to it.
            err_ref = (ref[n].double() - truth).norm()
            err_got = (got[n].double() - truth).norm()
            assert err_got <= 1.5 * err_ref + 1e-6 * truth.norm() + 1e-7, (n, err_got.item(), err_ref.item())


def _to_double(tree: object) -> object:
    return torch.utils._pytree.tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree
    )


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["bert_eager", "gpt2_eager", "llama_eager", "llama_sdpa", "t5_eager"])
def test_gradients_match_unmodified_model(name: str) -> None:
    model, args, kwargs = ZOO[name]()
    _loss(model(*args, **kwargs)).backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(on_report=reports.append, inner="eager"))
    _loss(compiled(*args, **kwargs)).backward()
    assert sum(1 for r in reports for d in r.decisions if d.op) > 0
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    model64 = copy.deepcopy(model).double()
    args64, kwargs64 = _to_double((args, kwargs))
    _loss(model64(*args64, **kwargs64)).backward()
    _assert_grads_close(got, ref, _grads(model64))


def test_inductor_forward_and_backward_bert() -> None:
    model, args, kwargs = ZOO["bert_eager"]()
    ref_outs = model(*args, **kwargs)
    ref_out = outputs_to_tensors(ref_outs)[0]
    _loss(ref_outs).backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend="attnrw", options={"on_report": reports.append})
    outs = compiled(*args, **kwargs)
    out = outputs_to_tensors(outs)[0]
    assert (out - ref_out).abs().max().item() <= 1e-5
    _loss(outs).backward()
    _assert_grads_close(_grads(model), ref)
    assert sum(1 for r in reports for d in r.decisions if d.op == "attention") == 2


def test_dynamic_lengths_compile_once() -> None:
    model, _, _ = ZOO["gpt2_eager"]()
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend=attnrw.backend(on_report=reports.append, inner="eager"), dynamic=True)
    with torch.no_grad():
        for seq in (5, 9, 16, 23):
            ids = torch.randint(0, 100, (2, seq))
            ref = model(input_ids=ids, use_cache=False).last_hidden_state
            out = compiled(input_ids=ids, use_cache=False).last_hidden_state
            assert (out - ref).abs().max().item() <= 1e-5
    assert len(reports) == 1, [r.summary() for r in reports]
    assert len(reports[0].sites) == 2 and all(s.causal for s in reports[0].sites)


def test_report_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    model, args, kwargs = ZOO["vit_sdpa"]()
    with caplog.at_level(logging.INFO, logger="attnrw"):
        torch.compile(model, backend=attnrw.backend(inner="eager"))(*args, **kwargs)
    lines = [r.getMessage() for r in caplog.records if r.name == "attnrw"]
    assert any("2 attention site(s), 2 rewritten" in m for m in lines), lines


def test_entry_point_backend_is_registered() -> None:
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "attnrw"]
    assert eps, "pip install -e . registers the torch_dynamo_backends entry point"
    assert eps[0].load() is attnrw.rewriter.backend.entry_point_backend
    assert "attnrw" in torch._dynamo.list_backends()


def test_options_parse_into_policy() -> None:
    policy, settings = parse_options({"policy": "sparse", "window": 256, "sinks": 4, "inner": "eager"})
    assert policy == Sparse(window=256, sinks=4)
    assert settings == BackendSettings(inner="eager")
    assert parse_options(None) == (Dense(), BackendSettings())
    assert parse_options({"policy": Sparse(window=8)})[0] == Sparse(window=8)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"policy": "sparse", "windw": 3}, "windw"),
        ({"policy": "nope"}, "unknown policy"),
        ({"policy": "sparse"}, "window"),
        ({"policy": "sparse", "window": 0}, "Sparse.window"),
        ({"inner": "tvm"}, "inner"),
    ],
)
def test_bad_options_raise(options: dict, match: str) -> None:
    with pytest.raises(attnrw.ConfigError, match=match):
        parse_options(options)


def test_bad_options_fail_compile() -> None:
    model, args, kwargs = ZOO["vit_sdpa"]()
    compiled = torch.compile(model, backend="attnrw", options={"policy": "dense", "bogus": 1})
    with pytest.raises(Exception, match="bogus"):
        compiled(*args, **kwargs)


def test_policy_dict_selects_sites() -> None:
    model, args, kwargs = ZOO["bert_eager"]()
    reports: list[attnrw.Report] = []
    spec = {"encoder.layer.1.*": Dense()}
    compiled = torch.compile(model, backend=attnrw.backend(spec, on_report=reports.append, inner="eager"))
    with torch.no_grad():
        ref = model(*args, **kwargs).last_hidden_state
        out = compiled(*args, **kwargs).last_hidden_state
    assert (out - ref).abs().max().item() <= 1e-5
    done = [d for d in reports[0].decisions if d.op]
    assert [d.module_path for d in done] == ["encoder.layer.1.attention.self"]
    assert [s.module_path for s in reports[0].skipped] == ["encoder.layer.0.attention.self"]
