"""``attnrw.export.register_translation``: an op defined outside attnrw exports through ``to_onnx`` once it has a
translation; an op with none is refused before the export, naming the op and the policy that emitted it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnxscript import opset18 as op

from attnrw.errors import ConfigError
from attnrw.export import register_translation, to_onnx, translation_table
from attnrw.export import registry
from attnrw.export._graph import const
from tests.export.sites import onnx_ops, qkv, run_onnx


@torch.library.custom_op(
    "attnrw_test::tempered_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal, float scale, float temperature) -> Tensor",
)
def tempered_attention(q, k, v, attn_mask, is_causal, scale, temperature):
    """Attention whose scores are divided by ``temperature`` before softmax."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale / temperature
    )


@tempered_attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale, temperature):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("attnrw_test::untranslated", mutates_args=())
def untranslated(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@untranslated.register_fake
def _(x):
    return torch.empty_like(x)


TRACED: list[float] = []  # the temperature of each call the exporter traced through tempered_onnx


def tempered_onnx(q, k, v, attn_mask=None, is_causal=False, scale=1.0, temperature=1.0):
    """The translation: MatMul / Softmax / MatMul with the tempered scale (no mask, not causal, as the test uses)."""
    TRACED.append(temperature)
    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(const(scale / temperature, "float32"), q))
    return op.MatMul(op.Softmax(s, axis=-1), v)


class TemperedSite(torch.nn.Module):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, q, k, v):
        return torch.ops.attnrw_test.tempered_attention(q, k, v, None, False, 0.3, self.temperature) + 1.0


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry for one test, so registrations made here do not leak."""
    monkeypatch.setattr(registry, "_TRANSLATIONS", dict(registry._TRANSLATIONS))


def test_custom_op_exports_through_its_registered_translation(tmp_path, scratch_registry):
    target = torch.ops.attnrw_test.tempered_attention.default
    seen = []

    def check(temperature: float, is_causal: bool) -> None:
        seen.append((temperature, is_causal))
        if temperature <= 0:
            raise ConfigError(f"tempered_attention needs temperature > 0, got {temperature}")

    assert target not in translation_table(23)
    assert register_translation(target, tempered_onnx, check=check) is tempered_onnx
    assert translation_table(18)[target] is tempered_onnx and translation_table(23)[target] is tempered_onnx

    args = qkv(2, 3, 3, 9)
    program = torch.export.export(TemperedSite(temperature=2.5), args)
    path = to_onnx(program, args, tmp_path / "t.onnx")  # verified in onnxruntime against the program
    assert seen == [(2.5, False)]  # the check got the node's arguments by name
    assert TRACED[-1] == 2.5  # the exporter translated the op with the registered function
    assert "MatMul" in onnx_ops(path) and "Softmax" in onnx_ops(path)

    q, k, v = args
    want = torch.softmax(q @ k.transpose(-1, -2) * (0.3 / 2.5), dim=-1) @ v + 1.0
    (got,) = run_onnx(path, *args)
    assert np.abs(got - want.numpy()).max() <= 1e-5

    bad = torch.export.export(TemperedSite(temperature=-1.0), args)
    with pytest.raises(ConfigError, match="temperature > 0"):
        to_onnx(bad, args, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_per_opset_translation(scratch_registry):
    target = torch.ops.attnrw_test.tempered_attention.default
    made = []

    def factory(opset: int):
        made.append(opset)
        return tempered_onnx

    register_translation(target, factory, per_opset=True)
    assert translation_table(20)[target] is tempered_onnx and made == [20]


class _PolicySite(torch.nn.Module):
    def forward(self, x):
        return torch.ops.attnrw_test.untranslated(x)


def test_op_without_translation_is_refused_naming_op_and_policy(tmp_path):
    x = torch.randn(2, 4)
    program = torch.export.export(_PolicySite(), (x,))
    (node,) = [n for n in program.graph.nodes if n.op == "call_function"]
    node.meta["attnrw_policy"] = "Tempered(temperature=2.0)"  # what the rewriter records on the nodes it emits
    with pytest.raises(ConfigError, match=r"torch\.ops\.attnrw_test\.untranslated\.default .*Tempered\(temperature=2\.0\)"):
        to_onnx(program, (x,), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_attnrw_op_without_translation_is_refused(tmp_path):
    class CondenseSite(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.attnrw.condensed_attention(q, k, v, None, True, 0.3, 4, 4, 1, "mean", True, 16, "torch")

    args = qkv(1, 2, 2, 32)
    program = torch.export.export(CondenseSite(), args)
    with pytest.raises(ConfigError, match=r"torch\.ops\.attnrw\.condensed_attention\.default \(at .*register_translation"):
        to_onnx(program, args, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [torch.ops.attnrw_test.tempered_attention, "attnrw_test::tempered_attention", 3])
def test_register_needs_an_op_overload(bad):
    with pytest.raises(ConfigError, match="overload"):
        register_translation(bad, tempered_onnx)


def test_register_needs_functions():
    with pytest.raises(ConfigError, match="must be a function"):
        register_translation(torch.ops.attnrw_test.tempered_attention.default, "not a function")
    with pytest.raises(ConfigError, match="check .* must be a function"):
        register_translation(torch.ops.attnrw_test.tempered_attention.default, tempered_onnx, check=math.pi)
