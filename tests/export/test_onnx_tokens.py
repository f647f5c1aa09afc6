"""The ops of ``Merge(mode="tokens")`` -> ONNX, against the ops in PyTorch.

``tokens_attention`` returns the output and the token state (``step``,
``index``, ``sizes``); the integer outputs must match exactly (the same
plan), the output within 1e-5 (fp32 summation orders). Sites of one program
form chains: a carried site takes the state of the site before it, as the
rewriter wires them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnrw
from attnrw.export import seq_dynamic_shapes, to_onnx, translation_table
from attnrw.kernels.merge import plan as plan_module
from tests.export.sites import check_text_model_at, make_mask, onnx_ops, qkv, run_onnx
from tests.zoo import ZOO

ops = torch.ops.attnrw

#: fp32 onnxruntime vs the op's fp32 PyTorch path, same plan: summation orders only.
ATOL = 1e-5
MODEL_ATOL = 1e-4


class TokenSites(torch.nn.Module):
    """``tokens_attention`` sites, each on its own q, k, v (and mask); a carried site continues the previous state.

    ``specs``: (ratio, r, protect, carried, has_mask) per site. Returns the four outputs of every site.
    """

    def __init__(self, specs: list[tuple]) -> None:
        super().__init__()
        self.specs = specs

    def forward(self, *tensors):
        outs, i, state = [], 0, (None, None)
        for ratio, r, protect, carried, has_mask in self.specs:
            q, k, v = tensors[i:i + 3]
            mask = tensors[i + 3] if has_mask else None
            i += 4 if has_mask else 3
            index, sizes = state if carried else (None, None)
            res = ops.tokens_attention(q, k, v, mask, 0.3, ratio, r, list(protect), index, sizes, "torch")
            outs.extend(res)
            state = res[2], res[3]
        return tuple(outs)


def _padding(batch: int, n: int, pads: list[int], kind: str = "bool", full_rows: bool = False) -> torch.Tensor:
    """Key padding: row b hides its last ``pads[b]`` keys; bool (B, 1, 1, N), or HF-style float (B, 1, N, N)."""
    keep = torch.ones(batch, n, dtype=torch.bool)
    for b, p in enumerate(pads):
        if p:
            keep[b, n - p:] = False
    m = keep[:, None, None, :].expand(batch, 1, n if full_rows else 1, n)
    if kind == "bool":
        return m.contiguous()
    return torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)


def _alternating(batch: int, n: int) -> torch.Tensor:
    """Real keys at even places, padding at odd ones: no A token has a B partner of its kind (fallback rounds)."""
    return (torch.arange(n) % 2 == 0).expand(batch, 1, 1, n).contiguous()


# name -> (heads, kv_heads, N, mask builder (n -> mask) or None, [(ratio, r, protect), ...]): a chain of sites.
CHAINS = {
    "no-mask": (2, 2, 13, None, [(0.3, -1, (0,)), (0.4, -1, (0,)), (0.0, 3, (0, 5))]),
    "bool-padding": (2, 2, 14, lambda n: _padding(2, n, [0, 4]), [(0.5, -1, (0,)), (0.5, -1, (0,))]),
    "hf-4d-float": (2, 2, 15, lambda n: _padding(2, n, [5, 2], "float", True), [(0.3, -1, (0,)), (0.3, -1, (0,))]),
    "per-query-float": (2, 2, 12, lambda n: make_mask("float", (2, 2, n, n)), [(0.3, -1, ()), (0.3, -1, ())]),
    "per-query-bool": (2, 2, 12, lambda n: make_mask("bool", (n, n)), [(0.25, -1, (0,)), (0.25, -1, (0,))]),
    "gqa": (4, 2, 12, None, [(0.0, 4, (0,)), (0.5, -1, (0,))]),
    "fallback": (2, 2, 10, lambda n: _alternating(2, n), [(0.0, 6, ())]),
    "ratio-0": (2, 2, 9, lambda n: _padding(2, n, [0, 3], "float", True), [(0.0, -1, (0,)), (0.4, -1, (0,)),
                                                                           (0.0, -1, (0,))]),
}


def _build(names: list[str], seed: int = 0):
    """The program's sites and inputs: each chain's later sites get random q, k, v of the previous merged length."""
    specs, inputs = [], []
    for name in names:
        heads, kv_heads, n, mask_fn, sites = CHAINS[name]
        mask = None if mask_fn is None else mask_fn(n)
        t, index, sizes = n, None, None
        for j, (ratio, r, protect) in enumerate(sites):
            seed += 1
            q, k, v = qkv(2, heads, kv_heads, t, dim=8, v_dim=6, seed=seed)
            carried = j > 0
            specs.append((ratio, r, protect, carried, mask is not None))
            inputs.extend([q, k, v] + ([] if mask is None else [mask]))
            _, _, index, sizes = ops.tokens_attention(
                q, k, v, mask, 0.3, ratio, r, list(protect), index if carried else None, sizes if carried else None,
                "torch",
            )
            t = sizes.shape[1]
    return TokenSites(specs), tuple(inputs)


def _compare(outs, refs, label) -> None:
    assert len(outs) == len(refs)
    for i, (got, want) in enumerate(zip(outs, refs)):
        assert got.shape == tuple(want.shape), (label, i)
        if want.is_floating_point():
            err = np.abs(got - want.numpy()).max()
            assert err <= ATOL, (label, i, err)
        else:
            assert np.array_equal(got, want.numpy()), (label, i)


GROUPS = {
    23: list(CHAINS),
    18: ["per-query-float", "hf-4d-float", "gqa", "fallback"],
}


@pytest.mark.parametrize("opset", list(GROUPS))
def test_tokens_attention_matches_op(tmp_path, monkeypatch, opset):
    """Every chain of the group in one program: fresh and carried sites, masks, protection, GQA, fallback rounds."""
    names = GROUPS[opset]
    model, args = _build(names)
    path = to_onnx(torch.export.export(model, args), args, tmp_path / "tokens.onnx", opset=opset, verify=False)
    found = onnx_ops(path)
    assert found.count("Loop") == len(model.specs)
    assert found.count("Attention") == (len(model.specs) if opset >= 23 else 0)

    fallbacks = []
    best_pair = plan_module._best_pair
    monkeypatch.setattr(plan_module, "_best_pair", lambda *a: fallbacks.append(1) or best_pair(*a))
    refs = model(*args)
    if "fallback" in names:
        assert len(fallbacks) >= 2  # the bipartite split stalls on alternating padding: single-pair rounds ran
    outs = run_onnx(path, *args)
    for s, spec in enumerate(model.specs):
        _compare(outs[4 * s:4 * s + 4], refs[4 * s:4 * s + 4], (opset, s, spec))
    # The carried sites continued a real merge: some incoming state had tokens of several members.
    assert any(int(refs[4 * s + 3].max()) > 1 for s in range(len(model.specs)))


class Carry(torch.nn.Module):
    """A fresh site, a carried one, and the residual stream merged along and restored: the rewriter's wiring."""

    def forward(self, q, k, v, mask, x):
        out, step, index, sizes = ops.tokens_attention(q, k, v, mask, 0.3, 0.3, -1, [0], None, None, "torch")
        res = ops.merge_tokens(x, None, None, index, sizes, 1, 0)
        rows = out.transpose(1, 2).flatten(2)  # (B, M, H·Dv)
        k2 = rows.unflatten(2, (2, 8)).transpose(1, 2)
        out2, step2, index2, sizes2 = ops.tokens_attention(k2, k2 * 0.5, k2, mask, 0.3, 0.4, -1, [0], index, sizes,
                                                           "torch")
        res2 = ops.merge_tokens(res + rows, index, sizes, index2, sizes2, 1, 0)
        full = ops.restore_tokens(res2 + out2.transpose(1, 2).flatten(2), index2, 1, 0)
        return full, step, step2, index2, sizes2


def test_dynamic_sequence_length(tmp_path):
    """One export with a dynamic length, run at others: counts, plans and layouts follow the run-time length."""
    model = Carry()
    n = 16
    q, k, v = qkv(2, 2, 2, n, dim=8, v_dim=8)
    mask, x = _padding(2, n, [0, 5], "float", True), torch.randn(2, n, 16)
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({2: dyn}, {2: dyn}, {2: dyn}, {2: dyn, 3: dyn}, {1: dyn})
    program = torch.export.export(model, (q, k, v, mask, x), dynamic_shapes=shapes)
    path = to_onnx(program, (q, k, v, mask, x), tmp_path / "dyn.onnx", dynamic_seq=True)
    sizes_seen = set()
    for length, pads in ((9, [2, 0]), (33, [7, 12]), (3, [0, 1])):
        q2, k2, v2 = qkv(2, 2, 2, length, dim=8, v_dim=8, seed=length)
        args = (q2, k2, v2, _padding(2, length, pads, "float", True), torch.randn(2, length, 16))
        refs = model(*args)
        _compare(run_onnx(path, *args), refs, length)
        sizes_seen.add(refs[-1].shape[1])
    assert len(sizes_seen) == 3


class Layouts(torch.nn.Module):
    """merge_tokens / restore_tokens on every layout the rewriter hands them, with states as inputs."""

    def forward(self, index1, sizes1, index2, sizes2, x, xh, x1, x4, xh16):
        b, n, c = x.shape
        m1 = ops.merge_tokens(x, None, None, index1, sizes1, 1, 0)
        outs = [
            m1,
            ops.merge_tokens(x.reshape(b * n, c), None, None, index1, sizes1, 0, 0),  # one batch-major axis
            ops.merge_tokens(x.transpose(0, 1), None, None, index1, sizes1, 0, 1),  # (N, B, C)
            ops.merge_tokens(xh, None, None, index1, sizes1, 1, 0),  # batch × heads on one axis
            ops.merge_tokens(x1, None, None, index1, sizes1, 1, 0),  # batch 1, broadcast
            ops.merge_tokens(m1, index1, sizes1, index2, sizes2, 1, 0),  # from one state to a later one
            ops.merge_tokens(x4, index1, sizes1, index2, sizes2, 2, 0),  # (B, H, T, d)
            ops.merge_tokens(xh16, None, None, index1, sizes1, 1, 0),  # fp16: sums in fp32
            ops.restore_tokens(m1, index1, 1, 0),
            ops.restore_tokens(m1.reshape(-1, c), index1, 0, 0),
            ops.restore_tokens(m1.transpose(0, 1), index1, 0, 1),
            ops.restore_tokens(ops.merge_tokens(x4, index1, sizes1, index2, sizes2, 2, 0), index2, 2, 0),
            ops.restore_tokens(x1[:, :sizes1.shape[1]], index1, 1, 0),
        ]
        return tuple(outs)


def test_merge_and_restore_layouts(tmp_path):
    b, n = 2, 14
    q, k, v = qkv(b, 2, 2, n, seed=8)
    mask = _padding(b, n, [0, 4])
    _, _, index1, sizes1 = ops.tokens_attention(q, k, v, mask, 0.3, 0.5, -1, [0], None, None, "torch")
    q2, k2, v2 = qkv(2, 2, 2, sizes1.shape[1], seed=9)
    _, _, index2, sizes2 = ops.tokens_attention(q2, k2, v2, mask, 0.3, 0.5, -1, [0], index1, sizes1, "torch")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, n, 6, generator=g)
    xh = torch.randn(b * 2, n, 3, generator=g)
    x1 = torch.randn(1, n, 6, generator=g)
    x4 = torch.randn(b, 2, sizes1.shape[1], 5, generator=g)
    xh16 = x.half()
    args = (index1, sizes1, index2, sizes2, x, xh, x1, x4, xh16)
    model = Layouts()
    path = to_onnx(torch.export.export(model, args), args, tmp_path / "layouts.onnx", verify=False)
    assert "Loop" not in onnx_ops(path)
    refs = model(*args)
    outs = run_onnx(path, *args)
    for i, (got, want) in enumerate(zip(outs, refs)):
        assert got.shape == tuple(want.shape) and got.dtype == want.numpy().dtype, i
        tol = 1e-3 if want.dtype == torch.float16 else 1e-6
        assert np.abs(got.astype(np.float64) - want.double().numpy()).max() <= tol, i


def test_translations_are_registered():
    table = translation_table(23)
    for name in ("tokens_attention", "merge_tokens", "restore_tokens"):
        assert getattr(ops, name).default in table


# ----------------------------------------------------------------------------- whole models


def _attnrw_ops(program) -> list[str]:
    return [n.target.name() for n in program.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "attnrw"]


@pytest.mark.parametrize("name", ["bert_sdpa", "vit_sdpa"])
def test_model_exports_and_verifies(tmp_path, name):
    """Merge(mode="tokens") with static shapes: two tokens sites, the residual merged along, restored at the end;
    to_onnx(verify=True) bounds every output at 1e-4 against the rewritten program."""
    model, args, kwargs = ZOO[name]()
    program = attnrw.rewrite(model, args, kwargs, policy=attnrw.Merge(ratio=0.25, mode="tokens"))
    found = _attnrw_ops(program)
    assert found.count("attnrw::tokens_attention") == 2 and "attnrw::restore_tokens" in found
    path = to_onnx(program, args, tmp_path / f"{name}.onnx", kwargs=kwargs)
    assert onnx_ops(path).count("Loop") == 2 and onnx_ops(path).count("Attention") == 2


def test_dynamic_sequence_falls_back_to_qkv(tmp_path):
    """With a dynamic length the rewriter keeps each tokens site as merged_attention(qkv) (the merged count would
    set the shapes after it); the file exports and verifies, and should run at any length."""
    import onnx

    model, args, kwargs = ZOO["bert_sdpa"]()
    policy = attnrw.Merge(ratio=0.25, mode="tokens")
    program = attnrw.rewrite(model, args, kwargs, policy=policy, dynamic_shapes=seq_dynamic_shapes(model, args, kwargs))
    assert _attnrw_ops(program) == ["attnrw::merged_attention"] * 2
    path = to_onnx(program, args, tmp_path / "bert.onnx", kwargs=kwargs)  # verified at the example length
    seq = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[1]
    assert not seq.HasField("dim_value") and not seq.dim_param.isdigit(), "the length was specialised"
    check_text_model_at(path, program, length=21, pad_row=1, pad_from=15, seed=11, atol=MODEL_ATOL)
