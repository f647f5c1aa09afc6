"""Failures that are the exporter's or onnxruntime's, told apart from attnrw's by a plain ``torch.onnx.export``.

Measured on torch 2.13 / onnxruntime 1.32: HF Falcon with ``alibi=True``
builds its ALiBi slopes in bfloat16, and onnxruntime has no CPU kernel for a
bfloat16 ``Mul`` ("Could not find an implementation for Mul(14)"). A plain
export of the unmodified model fails at opset 18 and 20 in onnxruntime with
that same node; at opset 23 it fails earlier, in the exporter, which cannot
translate Falcon's multi-query SDPA ("SDPA (MHA) requires q_num_heads =
kv_num_heads"). attnrw's export (its own translation of the attention) gets
past that and stops at the bfloat16 ``Mul``.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

import attnrw
from attnrw.errors import ExporterLimitError, VerificationError
from attnrw.export import registry, to_onnx
from attnrw.export.dense import attention_op23
from attnrw.export.verify import PLAIN_ERROR_FACTOR

ATTENTION = torch.ops.attnrw.attention.default


class Bf16SlopesAttention(torch.nn.Module):
    """A per-key bias computed in bfloat16 (as Falcon's ALiBi slopes are), added to attention scores.

    onnxruntime's CPU provider has no bfloat16 ``Mul``, so neither attnrw's
    export nor a plain one runs: both fail the same way, at load, on that op.
    """

    def __init__(self, heads: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)
        self.slopes = torch.nn.Parameter(torch.linspace(0.1, 0.5, heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # Computed from the input, so no exporter folds it into a constant.
        keys = x.mean(-1).bfloat16()[:, None, None, :]  # (B, 1, 1, S)
        bias = (self.slopes.bfloat16()[None, :, None, None] * keys).float()
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, -1)


class SdpaBlock(torch.nn.Module):
    """One SDPA attention; exports cleanly both ways."""

    def __init__(self, heads: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(seed))


def _falcon():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=True, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.FalconModel(cfg).eval()
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return model, dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("opset", [18, 23])
def test_falcon_alibi_is_the_exporters_limit(tmp_path, opset):
    """Falcon ALiBi: a plain export fails in onnxruntime too (opset 18) or already in the exporter (23)."""
    model, kwargs = _falcon()
    with pytest.raises(ExporterLimitError) as info:
        to_onnx(model, (), tmp_path / "falcon.onnx", kwargs=kwargs, opset=opset)
    msg = str(info.value)
    assert msg.startswith("the limit is the exporter's or onnxruntime's (Mul(14)), not attnrw's")
    assert "node 'node_mul_1'" in msg and "aten.mul.Tensor" in msg
    assert f"a plain torch.onnx.export of the unmodified model (dynamo=True, opset {opset}) fails too" in msg
    if opset == 18:
        assert "fails too, the same way" in msg
    else:
        assert "earlier, at export" in msg and "q_num_heads = kv_num_heads" in msg
    assert info.value.op == "Mul(14)" and info.value.stage == "load"
    assert isinstance(info.value, attnrw.AttnrwError) and not isinstance(info.value, VerificationError)
    assert not (tmp_path / "falcon.onnx").exists()


def test_bf16_op_fails_the_same_way(tmp_path):
    model = Bf16SlopesAttention().eval()
    with pytest.raises(ExporterLimitError, match=r"fails too, the same way: onnxruntime cannot load the file \(Mul\(14\)"):
        to_onnx(model, (_x(),), tmp_path / "m.onnx")


def test_program_failure_outside_attnrw_is_named_without_plain_export(tmp_path):
    """Given a program (no unmodified model to export), the failing node's origin alone decides."""
    model = Bf16SlopesAttention().eval()
    program = attnrw.rewrite(model, (_x(),))
    with pytest.raises(ExporterLimitError, match="not checked against a plain export"):
        to_onnx(program, (_x(),), tmp_path / "m.onnx")


def _replace_translation(monkeypatch, fn) -> None:
    monkeypatch.setitem(registry._TRANSLATIONS, ATTENTION, registry.Translation(ATTENTION, fn))


def test_wrong_translation_is_attnrws_and_stated_against_the_plain_export(tmp_path, monkeypatch):
    """A translation that computes the wrong value: VerificationError, with the plain export's own error beside it."""

    def wrong_scale(q, k, v, attn_mask=None, is_causal=False, scale=1.0):
        return attention_op23(q, k, v, attn_mask, is_causal, scale * 1.5)

    _replace_translation(monkeypatch, wrong_scale)
    with pytest.raises(VerificationError) as info:
        to_onnx(SdpaBlock().eval(), (_x(),), tmp_path / "m.onnx")
    msg = str(info.value)
    assert "a plain torch.onnx.export of the unmodified model is off by" in msg
    assert f"accepted only within {PLAIN_ERROR_FACTOR:g}x the plain export's error" in msg
    assert not isinstance(info.value, ExporterLimitError)


def test_translation_onnxruntime_cannot_load_is_attnrws(tmp_path, monkeypatch):
    """A translation emitting an op onnxruntime lacks: the original error, noted as attnrw's (the plain export works)."""

    def bf16_tail(q, k, v, attn_mask=None, is_causal=False, scale=1.0):
        y = op.Cast(attention_op23(q, k, v, attn_mask, is_causal, scale), to=ir.DataType.BFLOAT16)
        return op.Cast(op.Mul(y, y), to=ir.DataType.FLOAT)

    _replace_translation(monkeypatch, bf16_tail)
    with pytest.raises(Exception) as info:
        to_onnx(SdpaBlock().eval(), (_x(),), tmp_path / "m.onnx")
    assert not isinstance(info.value, ExporterLimitError)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "so this failure is attnrw's" in notes
    assert "Mul(14)" in str(info.value)


def test_rounding_within_factor_of_the_plain_export_is_accepted(tmp_path, caplog):
    """With a tolerance below fp32 rounding both exports miss it; attnrw's file is kept, as close as the plain one."""
    with caplog.at_level("WARNING", logger="attnrw.export"):
        path = to_onnx(SdpaBlock().eval(), (_x(),), tmp_path / "m.onnx", atol=1e-12)
    assert path.exists()
    assert f"within {PLAIN_ERROR_FACTOR:g}x a plain export's own error, accepted" in caplog.text
    assert "a plain torch.onnx.export of the unmodified model is off by" in caplog.text


def bf16_factory():
    """``MODEL`` for the CLI test: ``tests.export.test_onnx_exporter_limits:bf16_factory``."""
    torch.manual_seed(0)
    return Bf16SlopesAttention().eval(), (_x(),)


def test_cli_export_reports_the_exporter_limit(tmp_path, capsys):
    """``attnrw export``: one line naming the limit, exit status 1 (a failure, not a usage error), no file."""
    from attnrw.cli import main

    out = tmp_path / "m.onnx"
    code = main(["export", "tests.export.test_onnx_exporter_limits:bf16_factory", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("attnrw: export failed: the limit is the exporter's or onnxruntime's (Mul(14))")
    assert len(err.splitlines()) == 1 and not out.exists()
