"""A policy defined here, with its own custom op, reaches every way in through the contract alone.

``Temper`` scales a site's scores by ``temperature`` (an exact, checkable
change) through ``tests::tempered_attention``, an op this module registers.
Nothing under ``attnrw/`` knows of either: registration is all it takes for
``torch.compile`` options, ``attnrw.rewrite``, plans, the report and the CLI,
and ``to_onnx`` refuses it by name, since it has no ONNX translation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

import attnrw
from attnrw import cli
from attnrw.policies import base as policy_base


@torch.library.custom_op("tests::tempered_attention", mutates_args=())
def tempered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    temperature: float,
) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale * temperature)


@tempered_attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale, temperature):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@dataclass(frozen=True)
class Temper(attnrw.Policy):
    """Scores times ``temperature``."""

    temperature: float = 1.0
    """Factor on the attention scores."""

    name: ClassVar[str] = "temper_test"

    def lower(self, site):
        if site.causal:
            return attnrw.Keep("temper_test leaves causal sites alone")
        return attnrw.Lowering(torch.ops.tests.tempered_attention.default, {"temperature": self.temperature},
                               note=f"temperature {self.temperature}")

    def cost(self, site):
        return 0.5  # so that Auto, offered it, picks it


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(policy_base, "_REGISTRY", dict(policy_base._REGISTRY))
    attnrw.register_policy(Temper)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Attn(torch.nn.Module):
    """Self-attention whose scores are large enough that a change of temperature shows."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        with torch.no_grad():
            self.qkv.weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(b, s, d)


def make_model() -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    return Attn().eval(), (torch.randn(2, 10, 16),)


def reference(model: Attn, x: torch.Tensor, temperature: float) -> torch.Tensor:
    b, s, d = x.shape
    q, k, v = model.qkv(x).view(b, s, 3, model.heads, d // model.heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / (d // model.heads) ** 0.5 * temperature
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)


def _ops(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_the_change_shows() -> None:
    model, (x,) = make_model()
    with torch.no_grad():
        assert (reference(model, x, 0.5) - model(x)).abs().max() > 0.05


@torch.no_grad()
def test_compile_options_by_name() -> None:
    model, (x,) = make_model()
    reports: list[attnrw.Report] = []
    compiled = torch.compile(model, backend="attnrw",
                             options={"policy": "temper_test", "temperature": 0.5, "inner": "eager",
                                      "on_report": reports.append})
    torch.testing.assert_close(compiled(x), reference(model, x, 0.5), atol=1e-5, rtol=1e-5)
    (d,) = reports[0].decisions
    assert (d.policy, d.op, d.note) == ("temper_test", "tempered_attention", "temperature 0.5")


@torch.no_grad()
def test_rewrite_report_and_inspect() -> None:
    model, args = make_model()
    reports: list[attnrw.Report] = []
    ep = attnrw.rewrite(model, args, policy=Temper(0.5), report=reports)
    assert torch.ops.tests.tempered_attention.default in _ops(ep.graph_module)
    torch.testing.assert_close(ep.module()(*args), reference(model, args[0], 0.5), atol=1e-5, rtol=1e-5)
    assert "temper_test" in str(reports[0]) and "tempered_attention" in str(reports[0])
    # A different length than traced, through a dynamic program.
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = attnrw.rewrite(model, args, policy=Temper(0.5), dynamic_shapes=({1: seq},))
    x = torch.randn(2, 23, 16)
    torch.testing.assert_close(ep.module()(x), reference(model, x, 0.5), atol=1e-5, rtol=1e-5)
    sites = attnrw.inspect(model, args).sites
    assert len(sites) == 1 and sites[0].num_heads == 2


@torch.no_grad()
def test_saved_plan_applies_under_compile(tmp_path: Path) -> None:
    model, args = make_model()
    auto = attnrw.Auto(budget=10.0, candidates=(Temper(0.5),))
    plan = attnrw.calibrate(model, (args,), policy=auto)
    assert [e.policy for e in plan.entries] == [Temper(0.5)]
    path = plan.save(tmp_path / "plan.json")
    assert json.loads(path.read_text())["entries"][0]["policy"]["policy"] == "temper_test"
    assert attnrw.Plan.load(path).entries[0].policy == Temper(0.5)
    compiled = torch.compile(model, backend="attnrw", options={"plan": str(path), "inner": "eager"})
    torch.testing.assert_close(compiled(*args), reference(model, args[0], 0.5), atol=1e-5, rtol=1e-5)


def test_cli_flags_and_rewrite(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["rewrite", "--help"]) == 0
    assert "--temperature" in capsys.readouterr().out
    out = tmp_path / "m.pt2"
    code = cli.main(["rewrite", f"{__name__}:make_model", "-o", str(out), "--policy", "temper_test",
                     "--temperature", "0.25"])
    assert code == 0, capsys.readouterr().err
    ep = torch.export.load(out)
    assert torch.ops.tests.tempered_attention.default in _ops(ep.graph_module)
    model, (x,) = make_model()
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), reference(model, x, 0.25), atol=1e-5, rtol=1e-5)
    code = cli.main(["rewrite", f"{__name__}:make_model", "-o", str(tmp_path / "n.pt2"), "--policy",
                     "temper_test", "--temperature", "warm"])
    err = capsys.readouterr().err
    assert code == 2 and "--temperature" in err


def test_keep_goes_to_the_report() -> None:
    class Causal(Attn):
        def forward(self, x):
            b, s, d = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return out.transpose(1, 2).reshape(b, s, d)

    reports: list[attnrw.Report] = []
    ep = attnrw.rewrite(Causal().eval(), (torch.randn(1, 6, 16),), policy=Temper(0.5), report=reports)
    (d,) = reports[0].decisions
    assert (d.op, d.note) == ("attention", "temper_test leaves causal sites alone")
    assert torch.ops.attnrw.attention.default in _ops(ep.graph_module)


def test_a_lowering_with_a_wrong_argument_is_refused() -> None:
    @dataclass(frozen=True)
    class Wrong(Temper):
        name: ClassVar[str] = "wrong_test"

        def lower(self, site):
            return attnrw.Lowering(torch.ops.tests.tempered_attention.default, {"temprature": 2.0})

    attnrw.register_policy(Wrong)
    model, args = make_model()
    with pytest.raises(TypeError, match="temprature"):
        attnrw.rewrite(model, args, policy=Wrong())


def test_registration_checks() -> None:
    class NotFrozen(attnrw.Policy):
        name: ClassVar[str] = "not_frozen"

    with pytest.raises(TypeError, match="frozen dataclass"):
        attnrw.register_policy(dataclass(NotFrozen))
    with pytest.raises(ValueError, match="already registered"):
        attnrw.register_policy(dataclasses.make_dataclass("Other", [], bases=(Temper,), frozen=True,
                                                          namespace={"name": "sparse"}))


def test_onnx_refuses_an_op_without_translation(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model, args = make_model()
    with pytest.raises(attnrw.ConfigError, match="tempered_attention"):
        attnrw.export.to_onnx(model, args, tmp_path / "m.onnx", policy=Temper(0.5))
    assert not (tmp_path / "m.onnx").exists()
