"""``attnrw::sparse_attention`` -> ONNX: the chunked O(S·W) window, against the op's PyTorch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnrw.export import to_onnx
from attnrw.export.sparse import plan_layout
from attnrw.kernels.sparse import sparse_attention_torch
from tests.export.sites import DenseSite, SparseSite, chunked_attention_nodes, make_mask, onnx_ops, qkv, run_onnx

#: fp32 onnxruntime vs the op's fp32 PyTorch path: different summation orders
#: over at most window + sinks keys; observed ~5e-7.
ATOL = 1e-5


def _reference(site: SparseSite, q, k, v, mask=None) -> torch.Tensor:
    return sparse_attention_torch(q, k, v, mask, site.causal, site.scale, site.window, site.sinks, 0, 16)


# (causal, window, sinks, heads, kv_heads, mask kind, mask shape); S = 37 is not a
# multiple of any chunk the layout picks, so the padding path always runs.
CASES = [
    (True, 8, 0, 2, 2, "none", None),
    (False, 9, 3, 4, 2, "none", None),
    (True, 1, 0, 2, 1, "none", None),  # the query alone
    (True, 100, 2, 2, 2, "none", None),  # a window longer than the sequence
    (True, 8, 3, 4, 2, "bool", (2, 1, 1, 37)),  # padding mask: gathered along keys only
    (False, 8, 3, 4, 4, "float", (2, 4, 37, 37)),  # full additive mask: gathered at (q, k)
    (True, 12, 1, 4, 2, "bool", (37, 1)),  # per-query mask: some rows see nothing
]


@pytest.mark.parametrize("causal,window,sinks,heads,kv_heads,kind,mshape", CASES)
def test_sparse_matches_op(tmp_path, causal, window, sinks, heads, kv_heads, kind, mshape):
    site = SparseSite(window, sinks, causal)
    q, k, v = qkv(2, heads, kv_heads, 37)
    mask = make_mask(kind, mshape) if mshape else None
    args = (q, k, v) if mask is None else (q, k, v, mask)

    path = to_onnx(torch.export.export(site, args), args, tmp_path / "sparse.onnx")

    assert onnx_ops(path).count("Attention") == chunked_attention_nodes(path) == 1
    (out,) = run_onnx(path, *args)
    assert np.abs(out - _reference(site, *args).numpy()).max() <= ATOL


def test_sparse_opset18(tmp_path):
    site = SparseSite(6, 2, causal=True)
    q, k, v = qkv(1, 2, 1, 21)
    path = to_onnx(torch.export.export(site, (q, k, v)), (q, k, v), tmp_path / "s18.onnx", opset=18)
    ops = onnx_ops(path)
    assert "Attention" not in ops and "Softmax" in ops
    (out,) = run_onnx(path, q, k, v)
    assert np.abs(out - _reference(site, q, k, v).numpy()).max() <= ATOL


def test_sparse_dynamic_sequence_length(tmp_path):
    """One export, run at three lengths: a multiple of the chunk, one that is not, one shorter than the window."""
    site = SparseSite(window=8, sinks=2, causal=True)
    chunk = plan_layout(8, True, block_size=16).chunk
    seq = torch.export.Dim("seq", min=2, max=4096)
    q, k, v = qkv(1, 4, 2, 24)
    mask = make_mask("bool", (1, 1, 1, 24))
    dyn = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "mask": {3: seq}}
    program = torch.export.export(site, (q, k, v, mask), dynamic_shapes=dyn)
    path = to_onnx(program, (q, k, v, mask), tmp_path / "dyn.onnx", dynamic_seq=True)

    for length in (4 * chunk, 4 * chunk + 5, 5):
        q2, k2, v2 = qkv(1, 4, 2, length, seed=length)
        m2 = make_mask("bool", (1, 1, 1, length), seed=length)
        (out,) = run_onnx(path, q2, k2, v2, m2)
        assert out.shape == (1, 4, length, 6)
        assert np.abs(out - _reference(site, q2, k2, v2, m2).numpy()).max() <= ATOL, length


def _runtime_shapes(path, inputs: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Every value of the graph as onnxruntime computes it: the shapes a run really allocates."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    graph = model.graph
    known = {o.name for o in graph.output}
    for node in graph.node:
        for name in node.output:
            if name and name not in known:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                known.add(name)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return {n: np.shape(v) for n, v in zip(names, sess.run(None, inputs))}


def _quadratic(shapes: dict[str, tuple[int, ...]], seq: int) -> list[str]:
    return [f"{n}{s}" for n, s in shapes.items() if sum(d >= seq for d in s) >= 2]


def test_sparse_graph_has_no_seq_by_seq_tensor(tmp_path):
    """At S=2048, W=64 no value of the sparse graph has two axes >= S; the dense graph does (control)."""
    seq, window = 2048, 64
    q, k, v = qkv(1, 2, 1, seq, dim=16, v_dim=16)
    mask = make_mask("bool", (1, 1, 1, seq))
    args = (q, k, v, mask)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()}

    sparse = to_onnx(torch.export.export(SparseSite(window, 4, causal=False), args), args, tmp_path / "s.onnx", verify=False)
    shapes = _runtime_shapes(sparse, feeds)
    assert len(shapes) > 20
    assert _quadratic(shapes, seq) == []

    dense = to_onnx(torch.export.export(DenseSite(), args), args, tmp_path / "d.onnx", verify=False, opset=18)
    assert _quadratic(_runtime_shapes(dense, feeds), seq) != []
