"""Real ``transformers`` models (random init from configs) rewritten, exported and verified in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnrw
from attnrw.export import seq_dynamic_shapes, to_onnx
from tests.export.sites import chunked_attention_nodes, onnx_ops
from tests.zoo import ZOO, outputs_to_tensors

pytest.importorskip("transformers")

#: Verification inside to_onnx already bounds every output at 1e-4 against the
#: rewritten program; these models have 2 layers, so fp32 differences stay ~1e-6.
ATOL = 1e-4


@pytest.mark.parametrize(
    "name,policy,chunked",
    [
        ("bert_sdpa", attnrw.Dense(), 0),
        ("gpt2_eager", attnrw.Dense(), 0),
        ("bert_eager", attnrw.Sparse(window=4, sinks=1), 2),
    ],
)
def test_model_exports_and_verifies(tmp_path, name, policy, chunked):
    """Two layers: two Attention nodes, on (B, H, S, D) for Dense, on the chunked window for Sparse."""
    model, args, kwargs = ZOO[name]()
    path = to_onnx(model, args, tmp_path / f"{name}.onnx", kwargs=kwargs, policy=policy)
    assert onnx_ops(path).count("Attention") == 2
    assert chunked_attention_nodes(path) == chunked


def test_llama_sparse_dynamic_sequence(tmp_path):
    """GQA + RoPE + causal window: one export with a dynamic length, run at a longer one."""
    import onnxruntime as ort

    model, args, kwargs = ZOO["llama_sdpa"]()
    policy = attnrw.Sparse(window=4, sinks=1)
    path = to_onnx(model, args, tmp_path / "llama.onnx", kwargs=kwargs, policy=policy, dynamic_seq=True)

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 100, (2, 29), generator=g)
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[1, 25:] = 0
    dyn = seq_dynamic_shapes(model, args, kwargs)
    program = attnrw.rewrite(model, args, kwargs, policy=policy, dynamic_shapes=dyn)
    with torch.no_grad():
        ref = outputs_to_tensors(program.module()(input_ids=ids, attention_mask=mask, use_cache=False))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert np.abs(out - ref[0].numpy()).max() <= ATOL
