"""Tiny modules that call the attnrw ops directly, and helpers to run ONNX files.

A module here is what ``attnrw.rewrite`` returns for a model with one
attention site, without the matcher in the way: ``torch.export`` of it is a
program holding one ``torch.ops.attnrw.*`` call.
"""

from __future__ import annotations

import torch

import attnrw  # noqa: F401  (registers torch.ops.attnrw.*)


class DenseSite(torch.nn.Module):
    """``attnrw::attention`` on given q, k, v (and an optional mask)."""

    def __init__(self, causal: bool = False, scale: float = 0.3) -> None:
        super().__init__()
        self.causal, self.scale = causal, scale

    def forward(self, q, k, v, mask=None):
        return torch.ops.attnrw.attention(q, k, v, mask, self.causal, self.scale)


class SparseSite(torch.nn.Module):
    """``attnrw::sparse_attention`` with fixed window, sinks and topk."""

    def __init__(self, window: int, sinks: int = 0, causal: bool = True, topk: int = 0, scale: float = 0.3) -> None:
        super().__init__()
        self.window, self.sinks, self.causal, self.topk, self.scale = window, sinks, causal, topk, scale

    def forward(self, q, k, v, mask=None):
        return torch.ops.attnrw.sparse_attention(
            q, k, v, mask, self.causal, self.scale, self.window, self.sinks, self.topk, 16, "torch"
        )


def qkv(batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int | None = None, dim: int = 8, v_dim: int = 6, seed: int = 0):
    """Random q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)."""
    g = torch.Generator().manual_seed(seed)
    kv_len = q_len if kv_len is None else kv_len
    return (
        torch.randn(batch, heads, q_len, dim, generator=g),
        torch.randn(batch, kv_heads, kv_len, dim, generator=g),
        torch.randn(batch, kv_heads, kv_len, v_dim, generator=g),
    )


def make_mask(kind: str, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor | None:
    """A mask of ``kind`` "none", "bool" (about 30% hidden) or "float" (additive, with some -inf)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(shape, generator=g) > 0.3
    m = torch.randn(shape, generator=g)
    return m.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf"))


def onnx_ops(path) -> list[str]:
    """The op types of an ONNX file's main graph, in order."""
    import onnx

    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def chunked_attention_nodes(path) -> int:
    """How many ``Attention`` nodes take the 3-D chunked layout of the sparse translation (``q_num_heads`` set)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for n in graph.node if n.op_type == "Attention" and any(a.name == "q_num_heads" for a in n.attribute))


def run_onnx(path, *inputs: torch.Tensor) -> list:
    """Run an ONNX file in onnxruntime's CPU provider with positional inputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})


def check_text_model_at(path, program, length: int, pad_row: int, pad_from: int, seed: int, atol: float) -> None:
    """Run an exported text model (``input_ids``, ``attention_mask``) at another ``length``, with row ``pad_row``
    padded from ``pad_from``, in onnxruntime and compare every output with the program's within ``atol``."""
    import numpy as np
    import onnxruntime as ort

    from tests.zoo import outputs_to_tensors

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[pad_row, pad_from:] = 0
    with torch.no_grad():
        ref = outputs_to_tensors(program.module()(input_ids=ids, attention_mask=mask))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert len(outs) == len(ref)
    for got, want in zip(outs, ref):
        assert np.abs(got - want.numpy()).max() <= atol
