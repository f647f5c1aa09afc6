"""``to_onnx``: argument checks, atomic writes, verification failures, dynamic-shape rule, lean import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import attnrw
from attnrw.errors import ConfigError, VerificationError
from attnrw.export import OutputExistsError, seq_dynamic_shapes, to_onnx
from attnrw.export import verify as verify_mod
from tests.export.sites import DenseSite, SparseSite, qkv


@pytest.fixture(scope="module")
def small():
    """A one-site program and its inputs."""
    args = qkv(1, 2, 2, 6)
    return torch.export.export(DenseSite(causal=True), args), args


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("opset", [17, 26, "23", True, 23.0])
def test_unsupported_opset_names_the_range(tmp_path, small, opset):
    program, args = small
    with pytest.raises(ConfigError, match=r"\[18, 25\]"):
        to_onnx(program, args, tmp_path / "m.onnx", opset=opset)
    assert _leftovers(tmp_path) == []


def test_existing_file_needs_force(tmp_path, small):
    program, args = small
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="force=True"):
        to_onnx(program, args, target)
    assert target.read_bytes() == b"keep me"
    assert isinstance(OutputExistsError("x"), FileExistsError)

    to_onnx(program, args, target, force=True)
    assert target.read_bytes() != b"keep me"
    assert _leftovers(tmp_path) == ["m.onnx"]


def test_missing_directory_writes_nothing(tmp_path, small):
    program, args = small
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_onnx(program, args, tmp_path / "no" / "such" / "m.onnx")
    assert _leftovers(tmp_path) == []


def test_failed_write_leaves_no_partial_file(tmp_path, small, monkeypatch):
    """A save that dies half-way (disk full, unwritable target) leaves neither the file nor the staging folder."""
    from torch.onnx import ONNXProgram

    program, args = small

    def broken_save(self, destination, **kwargs):
        with open(destination, "wb") as f:
            f.write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ONNXProgram, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        to_onnx(program, args, tmp_path / "m.onnx")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("external_data", [False, True])
def test_verification_failure_writes_nothing(tmp_path, small, monkeypatch, external_data):
    """A mismatch raises VerificationError with both error measures; no model and no external data is left."""
    program, args = small
    real = verify_mod.reference_outputs
    monkeypatch.setattr(verify_mod, "reference_outputs", lambda *a: [t + 0.5 for t in real(*a)])
    with pytest.raises(VerificationError, match=r"max abs error 0\.5.*max rel error"):
        to_onnx(program, args, tmp_path / "m.onnx", external_data=external_data)
    assert _leftovers(tmp_path) == []


def test_external_data_is_written_beside_the_model(tmp_path, small):
    program, args = small
    to_onnx(torch.export.export(_WithWeight(), args), args, tmp_path / "w.onnx", external_data=True)
    assert _leftovers(tmp_path) == ["w.onnx", "w.onnx.data"]


class _WithWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 6)

    def forward(self, q, k, v):
        return self.proj(torch.ops.attnrw.attention(q, k, v, None, False, 0.5))


def test_sparse_topk_is_refused_before_export(tmp_path):
    args = qkv(1, 2, 2, 32)
    program = torch.export.export(SparseSite(8, topk=1), args)
    with pytest.raises(ConfigError, match="topk=0"):
        to_onnx(program, args, tmp_path / "m.onnx")
    assert _leftovers(tmp_path) == []


def test_program_arguments_that_do_not_apply(tmp_path, small):
    program, args = small
    with pytest.raises(ConfigError, match="policy= applies to a module"):
        to_onnx(program, args, tmp_path / "m.onnx", policy=attnrw.Sparse(window=4))
    with pytest.raises(ConfigError, match="only static input shapes"):
        to_onnx(program, args, tmp_path / "m.onnx", dynamic_seq=True)
    with pytest.raises(ConfigError, match="applies to a module"):
        to_onnx(program, args, tmp_path / "m.onnx", dynamic_shapes={"q": {2: torch.export.Dim.DYNAMIC}})
    with pytest.raises(ConfigError, match="not both"):
        to_onnx(DenseSite(), args, tmp_path / "m.onnx", dynamic_seq=True, dynamic_shapes={})
    with pytest.raises(TypeError, match="nn.Module or an ExportedProgram"):
        to_onnx(lambda x: x, args, tmp_path / "m.onnx")
    assert _leftovers(tmp_path) == []


def test_library_prints_nothing(tmp_path, small, capsys):
    program, args = small
    to_onnx(program, args, tmp_path / "m.onnx")
    assert capsys.readouterr().out == ""


class _Encoder(torch.nn.Module):
    def forward(self, input_ids, attention_mask, pixel_values=None, scale=1.0):
        return input_ids


def test_seq_dynamic_shapes_rule():
    """dim 1 of every rank>=2 input that shares the first such input's dim 1; nothing else."""
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.ones(2, 7)
    pixels = torch.zeros(2, 3, 8, 8)
    shapes = seq_dynamic_shapes(_Encoder(), (ids,), {"attention_mask": mask, "pixel_values": pixels})
    dyn = torch.export.Dim.DYNAMIC
    assert shapes == {"input_ids": {1: dyn}, "attention_mask": {1: dyn}, "pixel_values": None}
    with pytest.raises(ConfigError, match=">= 2"):
        seq_dynamic_shapes(_Encoder(), (torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)), None)
    with pytest.raises(ConfigError, match="rank >= 2"):
        seq_dynamic_shapes(_Encoder(), (torch.zeros(7), torch.ones(7)), None)


def test_import_attnrw_does_not_import_onnx():
    code = (
        "import sys, attnrw; "
        "bad = [m for m in ('onnx', 'onnxscript', 'onnxruntime', 'attnrw.export') if m in sys.modules]; "
        "assert not bad, bad; attnrw.export.to_onnx; assert 'onnx' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class _FixedLength(torch.nn.Module):
    """A position table of 7 rows: the sequence length cannot vary."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = torch.nn.Parameter(torch.zeros(7, 6))

    def forward(self, x, attention_mask):
        return x + self.pos + attention_mask.unsqueeze(-1)


def test_dynamic_seq_on_a_fixed_length_model_names_the_input(tmp_path):
    from attnrw.errors import DynamicShapeError

    args = (torch.randn(2, 7, 6), torch.ones(2, 7))
    with pytest.raises(DynamicShapeError, match=r"x \(dim 1, fixed to 7\)"):
        to_onnx(_FixedLength(), args, tmp_path / "m.onnx", dynamic_seq=True)
    assert _leftovers(tmp_path) == []
