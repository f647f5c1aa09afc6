"""Every model of the zoo exports to ONNX with Dense and verifies in onnxruntime; GPT-2 also with Sparse."""

from __future__ import annotations

import pytest

import attnrw
from attnrw.export import to_onnx
from tests.export.sites import chunked_attention_nodes, onnx_ops
from tests.zoo import EXPECTED_SITES, ZOO

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_exports_dense_and_verifies(tmp_path, name: str) -> None:
    model, args, kwargs = ZOO[name]()
    # verify=True (the default) runs onnxruntime and raises past 1e-4 max abs error.
    path = to_onnx(model, args, tmp_path / f"{name}.onnx", kwargs=kwargs)
    assert onnx_ops(path).count("Attention") == EXPECTED_SITES[name]


def test_gpt2_sparse_exports_and_verifies(tmp_path) -> None:
    model, args, kwargs = ZOO["gpt2_eager"]()
    path = to_onnx(model, args, tmp_path / "gpt2.onnx", kwargs=kwargs, policy=attnrw.Sparse(window=4, sinks=1))
    assert chunked_attention_nodes(path) == 2
