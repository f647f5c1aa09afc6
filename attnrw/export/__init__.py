"""ONNX export of rewritten models: ``attnrw.export.to_onnx``.

Each attnrw op has a translation into standard ONNX operators, registered by
op in its own module with :func:`register_translation` (which a policy with
its own op calls too; :mod:`attnrw.export.registry`):

* ``attnrw::attention`` -> one ``Attention`` node at opset >= 23, else
  MatMul / Softmax / MatMul (:mod:`attnrw.export.dense`);
* ``attnrw::sparse_attention`` (``topk=0``) -> a chunked O(S·W) window
  (:mod:`attnrw.export.sparse`);
* ``attnrw::merged_attention`` (``Merge(mode="kv" | "qkv")``) -> the
  token-merge plan in an ONNX ``Loop``, means over the merged tokens and one
  attention with the proportional bias (:mod:`attnrw.export.merge`);
* ``attnrw::tokens_attention``, ``attnrw::merge_tokens``,
  ``attnrw::restore_tokens`` (``Merge(mode="tokens")``) -> the same plan on
  a carried token state, and the merge / restore of the values that follow
  the reduced tokens (:mod:`attnrw.export.tokens`).

The file is verified in onnxruntime against the PyTorch program and written
atomically. This package imports onnx, onnxscript and onnxruntime;
``import attnrw`` loads it only when ``attnrw.export`` is first used.
"""

from attnrw.export import dense, merge, sparse, tokens  # noqa: F401  (each registers its translations)
from attnrw.export.api import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, supported_opsets, to_onnx
from attnrw.export.registry import register_translation, translation_table
from attnrw.export.verify import Comparison, verify_file
from attnrw.errors import OutputExistsError  # re-exported: it was defined here before
from attnrw.shapes import dynamic_seq_shapes
from attnrw.shapes import dynamic_seq_shapes as seq_dynamic_shapes  # the name it had here

__all__ = [
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "Comparison",
    "OutputExistsError",
    "dynamic_seq_shapes",
    "register_translation",
    "seq_dynamic_shapes",
    "supported_opsets",
    "to_onnx",
    "translation_table",
    "verify_file",
]
