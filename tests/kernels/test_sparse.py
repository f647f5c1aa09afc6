"""Tests of ``torch.ops.attnrw.sparse_attention`` (sinks + sliding window + block top-k).

The oracle is written here from the documented rule alone (it shares no code
with ``attnrw.kernels.sparse``): an explicit S×S allowed mask, the top-k
choice redone in float64, and textbook softmax attention in float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnrw
from attnrw.errors import ImplementationUnavailableError
from attnrw.kernels.sparse import sparse_attention_torch

ROOT = Path(__file__).resolve().parents[2]
op = torch.ops.attnrw.sparse_attention

BATCH, HEADS, KV_HEADS, DIM = 2, 4, 2, 16


# ----------------------------------------------------------------------------- oracle


def reference_allowed(
    q: torch.Tensor, k: torch.Tensor, block_size: int, window: int, sinks: int, topk: int, causal: bool
) -> torch.Tensor:
    """(batch, heads, S, S) bool: which keys each query sees under the documented rule (no user mask)."""
    batch, heads, seq, _ = q.shape
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    band = ((j <= i) & (j > i - window)) if causal else ((i - j).abs() <= window // 2)
    sink = (j < sinks) & ((j <= i) if causal else True)
    base = band | sink
    allowed = base.expand(batch, heads, seq, seq).clone()
    if topk == 0:
        return allowed
    nb = -(-seq // block_size)
    blk = torch.arange(seq) // block_size
    # Blocks any query of the block already sees (even partly) through band or sinks are not candidates.
    seen = torch.zeros(nb, nb, dtype=torch.bool)
    for qb in range(nb):
        rows = base[qb * block_size : (qb + 1) * block_size]
        for kb in range(nb):
            seen[qb, kb] = bool(rows[:, kb * block_size : (kb + 1) * block_size].any())
    cand = ~seen
    if causal:
        cand &= torch.arange(nb)[None, :] <= torch.arange(nb)[:, None]
    group = heads // k.shape[1]
    qd, kd = q.double(), k.double().repeat_interleave(group, dim=1)
    qm = torch.stack([qd[:, :, b * block_size : (b + 1) * block_size].mean(2) for b in range(nb)], 2)
    km = torch.stack([kd[:, :, b * block_size : (b + 1) * block_size].mean(2) for b in range(nb)], 2)
    score = (qm @ km.transpose(-1, -2)).masked_fill(~cand, float("-inf"))
    val, idx = score.topk(min(topk, nb), dim=-1)
    chosen = torch.zeros(batch, heads, nb, nb, dtype=torch.bool).scatter_(-1, idx, val > float("-inf"))
    extra = chosen[:, :, blk[:, None], blk[None, :]]
    if causal:
        extra &= j <= i
    return allowed | extra


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Float64 softmax attention over ``allowed`` and the user mask; rows seeing nothing give 0."""
    group = q.shape[1] // k.shape[1]
    kd = k.double().repeat_interleave(group, dim=1)
    vd = v.double().repeat_interleave(group, dim=1)
    s = q.double() @ kd.transpose(-1, -2) * scale
    vis = allowed
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            s = s + attn_mask.double()
            vis = vis & (attn_mask > float("-inf"))
    s = s.masked_fill(~vis, float("-inf"))
    any_vis = vis.any(-1, keepdim=True)
    # Keep the softmax of empty rows finite (so gradients are too), then zero them.
    p = torch.softmax(torch.where(any_vis, s, 0.0), dim=-1) * any_vis
    return p @ vd


def make_inputs(seq: int, dtype: torch.dtype = torch.float32, dim: int = DIM, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, seq, dim, generator=g).to(dtype)
    k = torch.randn(BATCH, KV_HEADS, seq, dim, generator=g).to(dtype)
    v = torch.randn(BATCH, KV_HEADS, seq, dim, generator=g).to(dtype)
    return q, k, v


def make_mask(kind: str, seq: int, seed: int = 1) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "padding":  # key padding, bool, (batch, 1, 1, S): the second sequence is 2/3 long
        m = torch.ones(BATCH, 1, 1, seq, dtype=torch.bool)
        m[1, ..., max(1, 2 * seq // 3) :] = False
        return m
    if kind == "additive":  # a per-head additive bias, (heads, S, S) broadcast over the batch
        return torch.randn(HEADS, seq, seq, generator=g)
    if kind == "bool":  # a general boolean mask, (batch, heads, S, S)
        return torch.rand(BATCH, HEADS, seq, seq, generator=g) > 0.3
    raise ValueError(kind)


# ----------------------------------------------------------------------------- torch path vs oracle

BLOCK, WINDOW = 16, 12


@pytest.mark.parametrize("mask_kind", ["none", "padding", "additive"])
@pytest.mark.parametrize("topk", [0, 2])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("seq", [1, 37, 64, 130])
def test_torch_matches_dense_reference(seq, causal, sinks, topk, mask_kind):
    q, k, v = make_inputs(seq)
    mask = make_mask(mask_kind, seq)
    scale = DIM**-0.5
    out = sparse_attention_torch(q, k, v, mask, causal, scale, WINDOW, sinks, topk, BLOCK)
    ref = reference_attention(q, k, v, reference_allowed(q, k, BLOCK, WINDOW, sinks, topk, causal), mask, scale)
    assert out.shape == (BATCH, HEADS, seq, DIM) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("block_size", [8, 32, 64])
def test_torch_other_block_sizes_and_bool_mask(causal, block_size):
    seq = 100
    q, k, v = make_inputs(seq, seed=3)
    mask = make_mask("bool", seq)
    out = op(q, k, v, mask, causal, 0.3, 20, 3, 2, block_size, "torch")
    ref = reference_attention(q, k, v, reference_allowed(q, k, block_size, 20, 3, 2, causal), mask, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_topk_adds_keys(causal):
    """The top-k blocks really change the result here (the comparisons above are not vacuous)."""
    q, k, v = make_inputs(130)
    without = reference_allowed(q, k, BLOCK, WINDOW, 3, 0, causal)
    with_topk = reference_allowed(q, k, BLOCK, WINDOW, 3, 2, causal)
    assert (with_topk & ~without).sum() > 0
    # ... and different heads choose different blocks.
    assert not torch.equal(with_topk[0, 0], with_topk[0, 1])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("seq", [37, 130])
def test_window_covering_sequence_is_dense(seq, causal):
    q, k, v = make_inputs(seq)
    group = HEADS // KV_HEADS
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=causal
    )
    for sinks, topk in ((0, 0), (4, 2)):
        out = op(q, k, v, None, causal, DIM**-0.5, 2 * seq + 1, sinks, topk, BLOCK, "torch")
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_many_sinks(causal):
    """More sinks than a block holds take the path that appends them once per query block."""
    q, k, v = make_inputs(70)
    mask = make_mask("padding", 70)
    out = sparse_attention_torch(q, k, v, mask, causal, 0.25, 10, 20, 2, 8)
    ref = reference_attention(q, k, v, reference_allowed(q, k, 8, 10, 20, 2, causal), mask, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_rows_without_keys_are_zero():
    q, k, v = make_inputs(40)
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    mask[..., 5, :] = False  # query 5 sees nothing
    additive = torch.zeros(40, 40).masked_fill(~mask[0, 0], float("-inf"))
    for m in (mask, additive):
        out = op(q, k, v, m, False, 0.25, 8, 2, 1, BLOCK, "torch")
        assert torch.all(out[:, :, 5] == 0) and torch.isfinite(out).all()
        assert out[:, :, 4].abs().sum() > 0


@pytest.mark.parametrize(
    "dtype, atol",
    [
        # Inputs and output are rounded to 11 (fp16) / 8 (bf16) significant bits; the
        # softmax and sums run in fp32 inside SDPA. Outputs are O(1): a few output ulps.
        (torch.float16, 4e-3),
        (torch.bfloat16, 3e-2),
    ],
)
def test_torch_half_precision(dtype, atol):
    q, k, v = make_inputs(70, dtype)
    mask = make_mask("additive", 70).to(dtype)
    out = op(q, k, v, mask, True, DIM**-0.5, WINDOW, 3, 2, BLOCK, "torch")
    assert out.dtype == dtype
    ref = reference_attention(q, k, v, reference_allowed(q, k, BLOCK, WINDOW, 3, 2, True), mask, DIM**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- gradients, registration


@pytest.mark.parametrize(
    "seq, causal, sinks, topk, mask_kind",
    [(37, True, 3, 2, "additive"), (64, False, 3, 2, "padding"), (130, False, 0, 2, "additive"), (50, True, 20, 0, "none")],
)
def test_gradients_match_reference(seq, causal, sinks, topk, mask_kind):
    q, k, v = (t.requires_grad_() for t in make_inputs(seq))
    mask = make_mask(mask_kind, seq)
    if mask is not None and mask.is_floating_point():
        mask.requires_grad_()
    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    scale = DIM**-0.5
    out = op(q, k, v, mask, causal, scale, WINDOW, sinks, topk, BLOCK, "torch")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    allowed = reference_allowed(q.detach(), k.detach(), BLOCK, WINDOW, sinks, topk, causal)
    ref = reference_attention(q, k, v, allowed, mask, scale)
    want = torch.autograd.grad(ref, leaves, grad_out.double())
    for name, a, b in zip(["q", "k", "v", "mask"], got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_small_chunks_match_reference(monkeypatch):
    """Work split into one chunk per (batch, kv head) and one query block per SDPA call / backward step."""
    from attnrw.kernels.sparse import reference

    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(reference, "_FOLD_CHUNK_ELEMS", 1)
    monkeypatch.setattr(reference, "_BACKWARD_CHUNK_ELEMS", 1)
    q, k, v = (t.requires_grad_() for t in make_inputs(45))
    mask = torch.randn(BATCH, HEADS, 45, 45, requires_grad=True)
    out = op(q, k, v, mask, True, 0.25, WINDOW, 3, 2, BLOCK, "torch")
    ref = reference_attention(q, k, v, reference_allowed(q.detach(), k.detach(), BLOCK, WINDOW, 3, 2, True), mask, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v, mask], grad_out)
    want = torch.autograd.grad(ref, [q, k, v, mask], grad_out.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def test_bool_mask_gets_no_gradient():
    q, k, v = (t.requires_grad_() for t in make_inputs(20))
    out = op(q, k, v, make_mask("padding", 20), False, 0.25, 8, 1, 0, 8, "torch")
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("mask_kind", ["additive", "padding"])
def test_opcheck(mask_kind):
    q, k, v = (t.requires_grad_() for t in make_inputs(37))
    mask = make_mask(mask_kind, 37)
    if mask.is_floating_point():
        mask.requires_grad_()
    torch.library.opcheck(op, (q, k, v, mask, True, 0.25, WINDOW, 3, 2, BLOCK, "torch"))


def test_fake_shapes():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        q = torch.empty(2, 4, 33, 16)
        kv = torch.empty(2, 2, 33, 16)
        v = torch.empty(2, 2, 33, 24)
        assert op(q, kv, v, None, False, 0.25, 8, 0, 0, 16, "auto").shape == (2, 4, 33, 24)


def test_rejects_unaligned_lengths():
    q = torch.randn(1, 2, 10, 16)
    k = torch.randn(1, 2, 12, 16)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        sparse_attention_torch(q, k, k, None, False, 0.25, 4, 0, 0, 8)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        op(q, k, k, None, False, 0.25, 4, 0, 0, 8, "torch")


def test_rejects_unknown_impl():
    q, k, v = make_inputs(8)
    with pytest.raises(ValueError, match="impl"):
        op(q, k, v, None, False, 0.25, 4, 0, 0, 8, "cuda")


def test_triton_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_inputs(8)
    with pytest.raises(ImplementationUnavailableError, match="TRITON_INTERPRET"):
        op(q, k, v, None, False, 0.25, 4, 0, 0, 8, "triton")


def _run_script(code: str, env: dict[str, str] | None = None, timeout: int = 240) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_import_is_lean_and_torch_path_needs_no_triton():
    """``import attnrw`` does not import triton, and impl='torch'/'auto' run with triton blocked."""
    out = _run_script(
        """
        import sys
        import attnrw, torch
        assert "triton" not in sys.modules, "import attnrw imported triton"
        sys.modules["triton"] = None  # any later `import triton` now fails
        q = torch.randn(1, 2, 20, 16)
        for impl in ("torch", "auto"):
            torch.ops.attnrw.sparse_attention(q, q, q, None, True, 0.25, 8, 2, 1, 8, impl)
        try:
            torch.ops.attnrw.sparse_attention(q, q, q, None, True, 0.25, 8, 2, 1, 8, "triton")
        except attnrw.ImplementationUnavailableError as e:
            print("unavailable:", e)
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    assert "unavailable: triton could not be imported" in out


# ----------------------------------------------------------------------------- Triton (interpreter)

# Per-dtype bounds of |triton - torch|, both paths fed the same inputs. fp32: the
# interpreter's dots are IEEE fp32 and the only difference is summation order (~1e-7
# relative). fp16: the kernel rounds probabilities to fp16 before the P·V dot (as flash
# attention does) and both round the output to fp16 (11 bits): a few 1e-3. bf16: 8
# significant bits, outputs up to ~3 in size, so one output ulp is up to 1.6e-2.
TRITON_BOUNDS = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 4e-2}

TRITON_CASES = {
    # id: (seq, dtype, causal, sinks, topk, block, mask_kind, head_dim)
    "fp32-bidir-plain-1": (1, "float32", False, 0, 0, 16, "none", 32),
    "fp32-causal-sinks-topk-37": (37, "float32", True, 3, 2, 16, "none", 32),
    "fp32-bidir-sinks-topk-pad-100": (100, "float32", False, 3, 2, 32, "padding", 32),
    "fp32-causal-additive-64": (64, "float32", True, 3, 2, 16, "additive", 32),
    "fp32-bidir-bool-headdim40-70": (70, "float32", False, 0, 2, 16, "bool", 40),
    "fp32-causal-block48-100": (100, "float32", True, 4, 1, 48, "padding", 64),
    "fp32-causal-manysinks-40": (40, "float32", True, 20, 1, 8, "additive", 32),
    "fp32-bidir-dense-window-45": (45, "float32", False, 2, 0, 16, "none", 32),
    "fp16-causal-sinks-topk-pad-70": (70, "float16", True, 3, 2, 16, "padding", 32),
    "bf16-bidir-sinks-topk-additive-70": (70, "bfloat16", False, 3, 2, 16, "additive", 32),
}


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory) -> dict[str, float]:
    """Run every Triton case in one interpreter subprocess (TRITON_INTERPRET must be set before triton loads)."""
    path = tmp_path_factory.mktemp("triton") / "results.json"
    cases = json.dumps(TRITON_CASES)
    _run_script(
        f"""
        import json, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_sparse import make_inputs, make_mask
        import attnrw
        from attnrw.kernels.sparse.reference import sparse_attention_torch
        from attnrw.kernels.sparse.triton import sparse_attention_triton
        results = {{}}
        for name, (seq, dtype, causal, sinks, topk, block, mask_kind, dim) in json.loads({cases!r}).items():
            dt = getattr(torch, dtype)
            q, k, v = make_inputs(seq, dt, dim=dim)
            mask = make_mask(mask_kind, seq)
            if mask is not None and mask.is_floating_point():
                mask = mask.to(dt)
            window = 2 * seq + 1 if "dense-window" in name else 12
            a = sparse_attention_torch(q, k, v, mask, causal, dim ** -0.5, window, sinks, topk, block)
            b = sparse_attention_triton(q, k, v, mask, causal, dim ** -0.5, window, sinks, topk, block)
            assert b.dtype == dt and b.shape == a.shape
            results[name] = (a.double() - b.double()).abs().max().item()
        # Through the op, with autograd (the backward is the PyTorch recomputation).
        q, k, v = (t.requires_grad_() for t in make_inputs(37))
        out = torch.ops.attnrw.sparse_attention(q, k, v, None, True, 0.25, 12, 3, 2, 16, "triton")
        out.sum().backward()
        ref = sparse_attention_torch(q.detach(), k.detach(), v.detach(), None, True, 0.25, 12, 3, 2, 16)
        results["op-triton-fp32"] = (out.detach().double() - ref.double()).abs().max().item()
        results["op-triton-grad-finite"] = float(not all(torch.isfinite(t.grad).all() for t in (q, k, v)))
        json.dump(results, open({str(path)!r}, "w"))
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", sorted(TRITON_CASES))
def test_triton_interpreter_matches_torch(triton_results, case):
    dtype = TRITON_CASES[case][1]
    assert triton_results[case] <= TRITON_BOUNDS[dtype], (case, triton_results[case])


def test_triton_through_op_with_backward(triton_results):
    assert triton_results["op-triton-fp32"] <= TRITON_BOUNDS["float32"]
    assert triton_results["op-triton-grad-finite"] == 0.0


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_triton_gpu_matches_torch(dtype, causal):
    seq, dim = 1000, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, seq, dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(2, 2, seq, dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(2, 2, seq, dim, device="cuda", generator=g).to(dtype)
    mask = torch.ones(2, 1, 1, seq, dtype=torch.bool, device="cuda")
    mask[1, ..., 700:] = False
    a = op(q, k, v, mask, causal, dim**-0.5, 128, 4, 2, 64, "torch")
    b = op(q, k, v, mask, causal, dim**-0.5, 128, 4, 2, 64, "triton")
    assert b.dtype == dtype
    bound = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 4e-2}[dtype]  # fp32: GPU dots may reorder
    torch.testing.assert_close(a.double(), b.double(), atol=bound, rtol=0)
    assert attnrw.kernels.sparse.op.resolve_impl("auto", q.device).__name__ == "sparse_attention_triton"
