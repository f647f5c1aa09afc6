"""``import attnrw`` stays lean: no triton, no onnx, no CUDA initialisation."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean() -> None:
    code = (
        "import sys, torch, attnrw\n"
        "heavy = [m for m in ('triton', 'onnx', 'onnxruntime', 'onnxscript') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert hasattr(torch.ops.attnrw, 'attention')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_public_api_names() -> None:
    import attnrw

    for name in ("inspect", "rewrite", "backend", "Dense", "Sparse", "Merge", "Condense", "Auto", "Report",
                 "AttentionSite"):
        assert hasattr(attnrw, name), name
    assert callable(attnrw.export.to_onnx)
