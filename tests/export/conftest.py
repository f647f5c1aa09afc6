"""The ONNX export tests need the optional onnx dependencies (``pip install attnrw[onnx]``)."""

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
