"""ONNX export of rewritten models: ``attnrw.export.to_onnx``.

Each attnrw op has a translation into standard ONNX operators:

* ``attnrw::attention`` -> one ``Attention`` node at opset >= 23, else
  MatMul / Softmax / MatMul (:mod:`attnrw.export.dense`);
* ``attnrw::sparse_attention`` (``topk=0``) -> a chunked O(S·W) window
  (:mod:`attnrw.export.sparse`).

The file is verified in onnxruntime against the PyTorch program and written
atomically. This package imports onnx, onnxscript and onnxruntime;
``import attnrw`` loads it only when ``attnrw.export`` is first used.
"""

from attnrw.export.api import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    OutputExistsError,
    seq_dynamic_shapes,
    supported_opsets,
    to_onnx,
    translation_table,
)
from attnrw.export.verify import Comparison, verify_file

__all__ = [
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "Comparison",
    "OutputExistsError",
    "seq_dynamic_shapes",
    "supported_opsets",
    "to_onnx",
    "translation_table",
    "verify_file",
]
