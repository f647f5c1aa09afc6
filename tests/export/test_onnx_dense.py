"""``attnrw::attention`` -> ONNX: ``Attention`` at opset >= 23, MatMul/Softmax/MatMul below; numerics in onnxruntime."""

from __future__ import annotations

import pytest
import torch

from attnrw.export import to_onnx
from attnrw.kernels.attention import math_attention
from tests.export.sites import DenseSite, make_mask, onnx_ops, qkv, run_onnx

#: fp32 onnxruntime vs the float64 textbook formula: both sides round once per
#: reduction; observed ~3e-7 at these sizes.
ATOL = 1e-5

# (opset, heads, kv_heads, causal, mask kind, mask shape): GQA and MHA, causal and
# not, a bool padding mask (B, 1, 1, S) that onnxruntime's Attention needs
# expanded, a per-head additive mask with -inf entries, a 2-D bool mask; the
# decomposed form (opset 18) on the same kinds.
CASES = [
    (23, 4, 4, False, "none", None),
    (23, 4, 2, True, "none", None),
    (23, 4, 2, False, "bool", (2, 1, 1, 7)),
    (23, 4, 1, True, "float", (2, 4, 7, 7)),
    (24, 4, 2, True, "bool", (7, 7)),
    (18, 4, 2, True, "bool", (2, 1, 1, 7)),
    (18, 4, 1, False, "float", (2, 4, 7, 7)),
    (18, 4, 2, True, "bool", (7, 7)),
]


@pytest.mark.parametrize("opset,heads,kv_heads,causal,kind,mshape", CASES)
def test_dense_matches_reference(tmp_path, opset, heads, kv_heads, causal, kind, mshape):
    q, k, v = qkv(2, heads, kv_heads, 7)
    mask = make_mask(kind, mshape) if mshape else None
    args = (q, k, v) if mask is None else (q, k, v, mask)
    program = torch.export.export(DenseSite(causal=causal), args)

    path = to_onnx(program, args, tmp_path / "dense.onnx", opset=opset)

    ops = onnx_ops(path)
    if opset >= 23:
        assert ops.count("Attention") == 1
    else:
        assert "Attention" not in ops and "Softmax" in ops
    (out,) = run_onnx(path, *args)
    ref = math_attention(q.double(), k.double(), v.double(), mask, causal, 0.3)
    assert torch.allclose(torch.from_numpy(out).double(), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("opset", [20, 23])
def test_cross_attention_lengths_and_empty_rows(tmp_path, opset):
    """q_len != kv_len, and rows the mask hides entirely give zeros, as in PyTorch."""
    q, k, v = qkv(1, 2, 2, 5, kv_len=9)
    mask = make_mask("bool", (1, 1, 5, 9))
    mask[..., 2, :] = False
    args = (q, k, v, mask)
    path = to_onnx(torch.export.export(DenseSite(), args), args, tmp_path / "cross.onnx", opset=opset)
    (out,) = run_onnx(path, *args)
    out = torch.from_numpy(out)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    ref = math_attention(q.double(), k.double(), v.double(), mask, False, 0.3)
    assert torch.allclose(out.double(), ref, atol=ATOL, rtol=0)


def test_dense_dynamic_sequence(tmp_path):
    """One export with a dynamic length runs at other lengths (decomposed and Attention forms)."""
    seq = torch.export.Dim("seq", min=2, max=128)
    q, k, v = qkv(1, 4, 2, 9)
    dyn = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}}
    program = torch.export.export(DenseSite(causal=True), (q, k, v), dynamic_shapes=dyn)
    for opset in (18, 23):
        path = to_onnx(program, (q, k, v), tmp_path / f"dyn{opset}.onnx", opset=opset, dynamic_seq=True)
        for length in (3, 17):
            q2, k2, v2 = qkv(1, 4, 2, length, seed=length)
            (out,) = run_onnx(path, q2, k2, v2)
            ref = math_attention(q2.double(), k2.double(), v2.double(), None, True, 0.3)
            assert torch.allclose(torch.from_numpy(out).double(), ref, atol=ATOL, rtol=0)
