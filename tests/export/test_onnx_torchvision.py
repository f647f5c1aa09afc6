"""torchvision's Swin (v1 and v2) through ``to_onnx``: found, written, loaded and verified in onnxruntime.

Needs torchvision, which does not import beside the CPU torch wheel the suite
installs (README): this module skips there and runs in an environment with
``torch==2.14.1 torchvision==0.29.1``. Before ``attnrw.export.prepare.broadcast_copies``
onnxruntime refused both files ("Transpose ... Invalid attribute perm {1, 0}",
from the shift mask's slice assignments); the idiom alone is tested without
torchvision in ``test_onnx_softcap.py``.
"""

from __future__ import annotations

import pytest
import torch

import attnrw
from attnrw.export import to_onnx
from tests.export.sites import run_onnx

torchvision = pytest.importorskip("torchvision")


@pytest.mark.slow  # about 30 s each on 2 CPU cores
@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_torchvision_swin_exports_and_verifies(tmp_path, name: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, 64, 64)
    report = attnrw.inspect(model, (x,))
    assert len(report.sites) == 12 and not report.skipped, str(report)
    path = to_onnx(model, (x,), tmp_path / f"{name}.onnx")  # verification on: raises if it differs
    (out,) = run_onnx(path, x)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-4, rtol=0)
