"""Softcapped sites and slice-assigned masks in ONNX: what onnxruntime computes against PyTorch.

``Gemma2SoftcapScores`` (``tests/patterns/test_idioms.py``) writes its padding
mask with an in-place slice assignment of a scalar, as does
``TorchvisionSwinShiftMask`` below (torchvision's shifted-window Swin): both
once gave files onnxruntime refused ("Transpose ... Invalid attribute perm")
until ``attnrw.export.prepare.broadcast_copies``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnrw
from attnrw.export import to_onnx
from attnrw.export.prepare import broadcast_copies
from tests.export.sites import onnx_ops, run_onnx
from tests.patterns.test_idioms import Gemma2SoftcapScores

ATOL = 1e-5


@pytest.mark.parametrize("opset", [18, 23])
@pytest.mark.parametrize("policy", [attnrw.Dense(), attnrw.Sparse(window=4, sinks=0)], ids=["dense", "sparse"])
def test_softcap_site_in_onnxruntime(tmp_path, opset: int, policy: attnrw.Policy) -> None:
    torch.manual_seed(0)
    model = Gemma2SoftcapScores().eval()
    x = model.example(13)
    path = to_onnx(model, (x,), tmp_path / "cap.onnx", policy=policy, opset=opset)  # verified against PyTorch
    ops = onnx_ops(path)
    assert ("Attention" in ops) == (opset >= 23) and ("Tanh" in ops) == (opset < 23), ops
    (out,) = run_onnx(path, x)
    with torch.no_grad():
        ref = attnrw.rewrite(model, (x,), policy=policy).module()(x)
        uncapped = model.reference(x)  # the dense, capped attention: equal only for Dense
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=ATOL, rtol=0)
    if isinstance(policy, attnrw.Dense):
        torch.testing.assert_close(torch.from_numpy(out), uncapped, atol=ATOL, rtol=0)


class TorchvisionSwinShiftMask(nn.Module):
    """torchvision's ``shifted_window_attention`` mask: region ids written by slice assignment, then compared.

    ``attn_mask[h0:h1, w0:w1] = count`` over a (H, W) grid; tokens of different
    regions get -100 added to their scores, as torchvision does.
    """

    def __init__(self, e: int = 16, heads: int = 2, d: int = 8, grid: tuple[int, int] = (4, 4)) -> None:
        super().__init__()
        self.heads, self.d, self.grid = heads, d, grid
        self.qkv = nn.Linear(e, 3 * heads * d)
        with torch.no_grad():
            self.qkv.weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, w = self.grid
        attn_mask = x.new_zeros((h, w))
        count = 0
        for hs in ((0, h - 2), (h - 2, h - 1), (h - 1, h)):
            for ws in ((0, w - 2), (w - 2, w - 1), (w - 1, w)):
                attn_mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        ids = attn_mask.view(1, n)
        attn_mask = (ids.unsqueeze(2) - ids.unsqueeze(1)).masked_fill(ids.unsqueeze(2) != ids.unsqueeze(1), -100.0)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        attn = (q * self.d**-0.5) @ k.transpose(-2, -1)
        attn = attn + attn_mask.masked_fill(attn_mask == 0, 0.0).unsqueeze(1)
        return (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)


def test_broadcasting_copy_is_expanded() -> None:
    model = TorchvisionSwinShiftMask().eval()
    program = torch.export.export(model, (torch.randn(2, 16, 16),)).run_decompositions()
    copies = [n for n in program.graph.nodes if n.target is torch.ops.aten.copy.default]
    assert copies and any(n.args[1].meta["val"].shape != n.args[0].meta["val"].shape for n in copies)
    x = torch.randn(2, 16, 16)
    before = program.module()(x)
    assert broadcast_copies(program) == len(copies)
    for n in copies:
        assert n.args[1].target is torch.ops.aten.expand.default
        assert n.args[1].meta["val"].shape == n.args[0].meta["val"].shape
    torch.testing.assert_close(program.module()(x), before, atol=0, rtol=0)
    assert broadcast_copies(program) == 0


@pytest.mark.parametrize("opset", [18, 23])
def test_slice_assigned_mask_exports_and_loads(tmp_path, opset: int) -> None:
    torch.manual_seed(0)
    model = TorchvisionSwinShiftMask().eval()
    x = torch.randn(2, 16, 16)
    path = to_onnx(model, (x,), tmp_path / "swin.onnx", opset=opset)
    assert "Attention" in onnx_ops(path) or opset < 23  # the site was found and rewritten
    (out,) = run_onnx(path, x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=ATOL, rtol=0)
