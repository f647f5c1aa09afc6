"""Tests of ``torch.ops.attnrw.condensed_attention`` (sinks + exact recent groups + group summaries).

The oracle is written here from the documented rule alone (it shares no code
with ``attnrw.kernels.condense``): per query, the sets of sink, exact and
summarised keys are built by walking positions in Python; summaries are
pooled group by group in float64; attention is a textbook softmax over the
keys and summaries each query sees.
"""

from __future__ import annotations

import functools
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

import attnrw
from attnrw.errors import ImplementationUnavailableError
from attnrw.kernels.condense import condensed_attention_torch
from tests.kernels.test_sparse import BATCH, DIM, HEADS, _run_script, make_inputs
from tests.kernels.test_sparse import make_mask as sparse_mask

op = torch.ops.attnrw.condensed_attention


# ----------------------------------------------------------------------------- oracle


@functools.lru_cache(maxsize=64)
def reference_sets(seq: int, recent: int, group: int, sinks: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S) bool: keys query i sees in person (sinks and exact); (S, ng) bool: groups it sees as summaries."""
    ng = max(0, math.ceil((seq - sinks) / group))

    def group_of(j: int) -> int:
        return (j - sinks) // group

    exact = torch.zeros(seq, seq, dtype=torch.bool)
    summary = torch.zeros(seq, ng, dtype=torch.bool)
    for i in range(seq):
        if causal:
            window = [j for j in range(i - recent + 1, i + 1) if j >= 0]
        else:
            window = [j for j in range(seq) if abs(i - j) <= recent // 2]
        touched = {group_of(j) for j in window if j >= sinks}
        for j in range(seq):
            if j < sinks:
                exact[i, j] = j <= i or not causal
            elif group_of(j) in touched:
                exact[i, j] = j <= i or not causal
        start = min((j for j in range(sinks, seq) if exact[i, j]), default=i + 1)
        for g in range(ng):
            if g in touched:
                continue
            last = min(sinks + (g + 1) * group, seq) - 1
            summary[i, g] = (last < start) if causal else True
    return exact, summary


def reference_condensed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    recent: int,
    group: int,
    sinks: int,
    pooling: str,
    size_bias: bool,
    block_size: int,
) -> torch.Tensor:
    """Float64 condensed attention by the documented rule; differentiable (autograd gives reference gradients)."""
    batch, heads, seq, _ = q.shape
    rep = heads // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    if attn_mask is None:
        m = torch.zeros(batch, heads, seq, seq, dtype=torch.float64)
    elif attn_mask.dtype == torch.bool:
        m = torch.where(attn_mask, 0.0, neg).double().expand(batch, heads, seq, seq)
    else:
        m = attn_mask.double().expand(batch, heads, seq, seq)
    exact, summary = reference_sets(seq, recent, group, sinks, causal)
    ng = summary.shape[1]
    nb = math.ceil(seq / block_size)
    blk = torch.arange(seq) // block_size
    # Member values: the max of the mask over the rows of each query block.
    a = torch.stack([m[:, :, b * block_size : (b + 1) * block_size].amax(2) for b in range(nb)], 2)  # (B, H, nb, S)
    probe = torch.stack([qd[:, :, b * block_size : (b + 1) * block_size].mean(2) for b in range(nb)], 2)
    ks, vs, bias = [], [], []
    for g in range(ng):
        idx = list(range(sinks + g * group, min(sinks + (g + 1) * group, seq)))
        ag = a[..., idx]  # (B, H, nb, n)
        z = ag if pooling == "mean" else ag + scale * probe @ kd[:, :, idx].transpose(-1, -2)
        alive = ag > float("-inf")
        any_alive = alive.any(-1, keepdim=True)
        w = torch.softmax(torch.where(alive, z, -1e300), -1) * alive * any_alive
        ks.append(w @ kd[:, :, idx])
        vs.append(w @ vd[:, :, idx])
        safe = torch.where(alive, ag, -1e300)
        b_g = torch.logsumexp(safe, -1) if size_bias else safe.amax(-1)
        bias.append(torch.where(any_alive[..., 0], b_g, neg))
    s_keys = torch.where(exact, qd @ kd.transpose(-1, -2) * scale + m, neg)
    if ng:
        ks_t, vs_t, bias_t = torch.stack(ks, 3), torch.stack(vs, 3), torch.stack(bias, 3)  # (B, H, nb, ng, ·)
        s_sum = (qd[:, :, :, None, :] * ks_t[:, :, blk]).sum(-1) * scale + bias_t[:, :, blk]
        # A query sees a summary only if its own mask row allows some key of the group.
        row_allows = torch.stack([(m[..., sinks + g * group : sinks + (g + 1) * group] > float("-inf")).any(-1) for g in range(ng)], -1)
        s_sum = torch.where(summary & row_allows, s_sum, neg)
        s = torch.cat([s_keys, s_sum], -1)
        values = torch.cat([vd[:, :, None].expand(-1, -1, seq, -1, -1), vs_t[:, :, blk]], 3)
    else:
        s, values = s_keys, vd[:, :, None].expand(-1, -1, seq, -1, -1)
    seen = s > float("-inf")
    any_seen = seen.any(-1, keepdim=True)
    p = torch.softmax(torch.where(any_seen, s, 0.0), -1) * seen * any_seen
    return (p[..., None] * values).sum(-2)


def make_mask(kind: str, seq: int, seed: int = 1) -> torch.Tensor | None:
    """The sparse tests' masks (none, padding, additive, bool), plus the Hugging Face causal padding form."""
    if kind == "causal-padding":  # (batch, 1, S, S) additive, finfo.min where masked
        keep = torch.ones(seq, seq, dtype=torch.bool).tril() & sparse_mask("padding", seq)[:, :, :1, :]
        return torch.zeros(BATCH, 1, seq, seq).masked_fill(~keep, torch.finfo(torch.float32).min)
    return sparse_mask(kind, seq, seed)


# ----------------------------------------------------------------------------- torch path vs oracle

RECENT, GROUP, BLOCK = 12, 5, 16  # group does not divide the lengths below; recent is not a multiple of it


@pytest.mark.parametrize("mask_kind", ["none", "padding", "additive", "causal-padding"])
@pytest.mark.parametrize("pooling, size_bias", [("mean", False), ("mean", True), ("query", False), ("query", True)])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("seq", [1, 37, 70])
def test_torch_matches_reference(seq, causal, sinks, pooling, size_bias, mask_kind):
    q, k, v = make_inputs(seq)
    mask = make_mask(mask_kind, seq)
    args = (mask, causal, DIM**-0.5, RECENT, GROUP, sinks, pooling, size_bias, BLOCK)
    out = condensed_attention_torch(q, k, v, *args)
    ref = reference_condensed(q, k, v, *args)
    assert out.shape == (BATCH, HEADS, seq, DIM) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "recent, group, sinks, block_size",
    [(1, 4, 0, 8), (7, 16, 2, 48), (40, 3, 5, 8), (12, 5, 20, 16), (9, 1, 1, 16)],
    ids=["recent1", "group>recent", "wide", "many-sinks", "group1"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_torch_other_geometries_and_bool_mask(causal, recent, group, sinks, block_size):
    q, k, v = make_inputs(53, seed=3)
    mask = make_mask("bool", 53)
    for pooling in ("mean", "query"):
        args = (mask, causal, 0.3, recent, group, sinks, pooling, True, block_size)
        out = op(q, k, v, *args, "torch")
        torch.testing.assert_close(out.double(), reference_condensed(q, k, v, *args), atol=1e-5, rtol=0)


def _dense(q, k, v, causal, mask=None):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, is_causal=causal
    )


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("seq", [37, 70])
def test_group_one_or_covering_window_is_dense(seq, causal):
    q, k, v = make_inputs(seq)
    dense = _dense(q, k, v, causal)
    for pooling in ("mean", "query"):
        for size_bias in (False, True):
            for recent, group, sinks in ((5, 1, 0), (5, 1, 3), (2 * seq + 1, 4, 0), (2 * seq + 1, 7, 2)):
                out = op(q, k, v, None, causal, DIM**-0.5, recent, group, sinks, pooling, size_bias, BLOCK, "torch")
                torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)


def test_summaries_matter():
    """The comparisons above are not vacuous: summaries change the result, and the poolings differ."""
    q, k, v = make_inputs(70)
    exact, summary = reference_sets(70, RECENT, GROUP, 3, True)
    assert summary.any(1)[40:].all() and exact[60, :3].all() and not exact[60, 3:30].any()
    args = (None, True, DIM**-0.5, RECENT, GROUP, 3)
    mean = op(q, k, v, *args, "mean", False, BLOCK, "torch")
    query = op(q, k, v, *args, "query", False, BLOCK, "torch")
    sized = op(q, k, v, *args, "mean", True, BLOCK, "torch")
    dense = _dense(q, k, v, True)
    for a, b in ((mean, dense), (mean, query), (mean, sized)):
        assert (a - b).abs().max() > 1e-2


def test_rows_without_keys_are_zero():
    q, k, v = make_inputs(40)
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    mask[..., 5, :] = False  # query 5 sees nothing
    additive = torch.zeros(40, 40).masked_fill(~mask[0, 0], float("-inf"))
    for m in (mask, additive):
        for pooling in ("mean", "query"):
            out = op(q, k, v, m, False, 0.25, 8, 4, 2, pooling, True, BLOCK, "torch")
            assert torch.all(out[:, :, 5] == 0) and torch.isfinite(out).all()
            assert out[:, :, 4].abs().sum() > 0


@pytest.mark.parametrize(
    "dtype, atol",
    [
        # Inputs, summaries and output are rounded to 11 (fp16) / 8 (bf16) significant bits;
        # softmax and sums run in fp32. Outputs are O(1): a few output ulps.
        (torch.float16, 4e-3),
        (torch.bfloat16, 4e-2),
    ],
)
def test_torch_half_precision(dtype, atol):
    q, k, v = make_inputs(70, dtype)
    mask = make_mask("additive", 70).to(dtype)
    args = (mask, True, DIM**-0.5, RECENT, GROUP, 3, "query", True, BLOCK)
    out = op(q, k, v, *args, "torch")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference_condensed(q, k, v, *args), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- gradients, registration


@pytest.mark.parametrize(
    "seq, causal, sinks, pooling, size_bias, mask_kind",
    [
        (37, True, 3, "query", True, "additive"),
        (70, False, 3, "mean", False, "additive"),
        (70, False, 0, "query", False, "padding"),
        (50, True, 2, "mean", True, "causal-padding"),
        (45, False, 20, "query", True, "none"),
    ],
)
def test_gradients_match_reference(seq, causal, sinks, pooling, size_bias, mask_kind):
    q, k, v = (t.requires_grad_() for t in make_inputs(seq))
    mask = make_mask(mask_kind, seq)
    if mask_kind == "additive":
        mask.requires_grad_()
    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    args = (mask, causal, DIM**-0.5, RECENT, GROUP, sinks, pooling, size_bias, BLOCK)
    out = op(q, k, v, *args, "torch")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(reference_condensed(q, k, v, *args), leaves, grad_out.double())
    for name, a, b in zip(["q", "k", "v", "mask"], got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_small_chunks_match_reference(monkeypatch):
    """One chunk per (batch, kv head) and one block per SDPA call / backward step."""
    from attnrw.kernels.condense import grads, parts

    for module, name in ((parts, "_CHUNK_BYTES"), (parts, "_RANGE_ELEMS"), (grads, "_BACKWARD_RANGE_ELEMS")):
        monkeypatch.setattr(module, name, 1)
    q, k, v = (t.requires_grad_() for t in make_inputs(45))
    mask = torch.randn(BATCH, HEADS, 45, 45, requires_grad=True)
    for pooling in ("mean", "query"):
        args = (mask, True, 0.25, RECENT, GROUP, 3, pooling, True, BLOCK)
        out = op(q, k, v, *args, "torch")
        ref = reference_condensed(q, k, v, *args)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, [q, k, v, mask], grad_out)
        want = torch.autograd.grad(ref, [q, k, v, mask], grad_out.double())
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def test_bool_mask_gets_no_gradient():
    q, k, v = (t.requires_grad_() for t in make_inputs(20))
    out = op(q, k, v, make_mask("padding", 20), False, 0.25, 6, 3, 1, "query", False, 8, "torch")
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("mask_kind, pooling", [("additive", "query"), ("padding", "mean")])
def test_opcheck(mask_kind, pooling):
    q, k, v = (t.requires_grad_() for t in make_inputs(37))
    mask = make_mask(mask_kind, 37)
    if mask.is_floating_point():
        mask.requires_grad_()
    torch.library.opcheck(op, (q, k, v, mask, True, 0.25, RECENT, GROUP, 3, pooling, True, BLOCK, "torch"))


def test_fake_shapes_and_layout():
    """Output (batch, heads, S, Dv) laid out as SDPA's (batch, S, heads, Dv), real and fake alike."""
    q, k = torch.randn(2, 4, 33, 16), torch.randn(2, 2, 33, 16)
    v = torch.randn(2, 2, 33, 24)
    real = op(q, k, v, None, False, 0.25, 8, 4, 0, "mean", False, 16, "torch")
    assert real.shape == (2, 4, 33, 24) and real.stride() == (33 * 4 * 24, 24, 4 * 24, 1)
    torch.testing.assert_close(real, reference_condensed(q, k, v, None, False, 0.25, 8, 4, 0, "mean", False, 16).float())
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = op(fq, fk, fv, None, False, 0.25, 8, 4, 0, "mean", False, 16, "auto")
        assert fake.shape == real.shape and fake.stride() == real.stride()


def test_rejects_bad_arguments():
    q = torch.randn(1, 2, 10, 16)
    k = torch.randn(1, 2, 12, 16)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        condensed_attention_torch(q, k, k, None, False, 0.25, 4, 2, 0, "mean", False, 8)
    with pytest.raises(ValueError, match="condensed_attention.*q_len == kv_len"):
        op(q, k, k, None, False, 0.25, 4, 2, 0, "mean", False, 8, "torch")
    for bad in ((0, 2, "mean", "torch"), (4, 0, "mean", "torch"), (4, 2, "max", "torch"), (4, 2, "mean", "cuda")):
        recent, group, pooling, impl = bad
        with pytest.raises(ValueError, match="recent|group|pooling|impl"):
            op(q, q, q, None, False, 0.25, recent, group, 0, pooling, False, 8, impl)


def test_triton_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_inputs(8)
    with pytest.raises(ImplementationUnavailableError, match="TRITON_INTERPRET"):
        op(q, k, v, None, False, 0.25, 4, 2, 0, "mean", False, 8, "triton")


def test_torch_path_needs_no_triton():
    """impl='torch'/'auto' run with triton blocked; an explicit 'triton' says why it cannot."""
    out = _run_script(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now fails
        import attnrw, torch
        q = torch.randn(1, 2, 20, 16)
        for impl in ("torch", "auto"):
            torch.ops.attnrw.condensed_attention(q, q, q, None, True, 0.25, 6, 3, 1, "query", True, 8, impl)
        try:
            torch.ops.attnrw.condensed_attention(q, q, q, None, True, 0.25, 6, 3, 1, "query", True, 8, "triton")
        except attnrw.ImplementationUnavailableError as e:
            print("unavailable:", e)
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    assert "unavailable: triton could not be imported" in out


# ----------------------------------------------------------------------------- Triton (interpreter)

# Per-dtype bounds of |triton - torch|, both paths fed the same inputs and the same
# summary tables. fp32: the interpreter's dots are IEEE fp32; only the summation order
# differs (~1e-7 relative). fp16: the kernel rounds probabilities to fp16 before the P·V
# dot (as flash attention does) and both round the output to fp16 (11 bits): a few 1e-3.
# bf16: 8 significant bits on outputs up to ~3: one output ulp is up to 1.6e-2.
TRITON_BOUNDS = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 4e-2}

TRITON_CASES = {
    # id: (seq, dtype, causal, sinks, pooling, size_bias, block, mask_kind, head_dim)
    "fp32-bidir-plain-1": (1, "float32", False, 0, "mean", False, 16, "none", 32),
    "fp32-causal-sinks-query-37": (37, "float32", True, 3, "query", True, 16, "none", 32),
    "fp32-bidir-sinks-mean-pad-70": (70, "float32", False, 3, "mean", True, 32, "padding", 32),
    "fp32-causal-additive-query-64": (64, "float32", True, 3, "query", False, 16, "additive", 32),
    "fp32-bidir-bool-headdim40-53": (53, "float32", False, 0, "query", True, 16, "bool", 40),
    "fp32-causal-hfmask-block48-70": (70, "float32", True, 1, "mean", True, 48, "causal-padding", 64),
    "fp32-causal-manysinks-40": (40, "float32", True, 20, "mean", False, 8, "additive", 32),
    "fp32-bidir-dense-window-45": (45, "float32", False, 2, "query", True, 16, "none", 32),
    "fp16-causal-query-pad-70": (70, "float16", True, 3, "query", True, 16, "padding", 32),
    "bf16-bidir-mean-additive-70": (70, "bfloat16", False, 3, "mean", True, 16, "additive", 32),
}


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory) -> dict[str, float]:
    """Run every Triton case in one interpreter subprocess (TRITON_INTERPRET must be set before triton loads)."""
    path = tmp_path_factory.mktemp("triton") / "results.json"
    cases = json.dumps(TRITON_CASES)
    _run_script(
        f"""
        import json, torch
        import attnrw
        from tests.kernels.test_condense import make_inputs, make_mask, RECENT, GROUP
        from attnrw.kernels.condense.reference import condensed_attention_torch
        from attnrw.kernels.condense.triton import condensed_attention_triton
        results = {{}}
        for name, (seq, dtype, causal, sinks, pooling, size_bias, block, mask_kind, dim) in json.loads({cases!r}).items():
            dt = getattr(torch, dtype)
            q, k, v = make_inputs(seq, dt, dim=dim)
            mask = make_mask(mask_kind, seq)
            if mask is not None and mask.is_floating_point():
                mask = mask.to(dt)
            recent = 2 * seq + 1 if "dense-window" in name else RECENT
            args = (mask, causal, dim ** -0.5, recent, GROUP, sinks, pooling, size_bias, block)
            a = condensed_attention_torch(q, k, v, *args)
            b = condensed_attention_triton(q, k, v, *args)
            assert b.dtype == dt and b.shape == a.shape and b.stride() == a.stride()
            results[name] = (a.double() - b.double()).abs().max().item()
        # Through the op, with autograd (the backward is the PyTorch recomputation).
        q, k, v = (t.requires_grad_() for t in make_inputs(37))
        args = (None, True, 0.25, RECENT, GROUP, 3, "query", True, 16)
        out = torch.ops.attnrw.condensed_attention(q, k, v, *args, "triton")
        out.sum().backward()
        ref = condensed_attention_torch(q.detach(), k.detach(), v.detach(), *args)
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
    args = (mask, causal, dim**-0.5, 128, 16, 4, "query", True, 64)
    a = op(q, k, v, *args, "torch")
    b = op(q, k, v, *args, "triton")
    assert b.dtype == dtype
    bound = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 4e-2}[dtype]  # fp32: GPU dots may reorder
    torch.testing.assert_close(a.double(), b.double(), atol=bound, rtol=0)
    assert attnrw.kernels.condense.op.resolve_impl("auto", q.device).__name__ == "condensed_attention_triton"


# ----------------------------------------------------------------------------- models

# Test-model checks through the rewriter: the zoo's tiny models have 12 tokens (8 for
# the encoder-decoders), so recent=4, group=2 condenses most of each sequence.
MODELS = ["llama_eager", "gpt2_sdpa", "bert_eager"]


def _outputs(out) -> list[torch.Tensor]:
    from tests.zoo import outputs_to_tensors

    return outputs_to_tensors(out)


@pytest.mark.parametrize("name", MODELS)
def test_models_compile_and_export(name):
    from tests.zoo import ZOO

    model, args, kwargs = ZOO[name]()
    with torch.no_grad():
        ref = _outputs(model(*args, **kwargs))
        torch._dynamo.reset()
        options = {"policy": "condense", "recent": 4, "group": 2, "sinks": 0, "inner": "eager"}
        compiled = _outputs(torch.compile(model, backend="attnrw", options=options)(*args, **kwargs))
        policy = attnrw.Condense(recent=4, group=2, sinks=1, pooling="query", size_bias=True, block_size=4)
        ep = attnrw.rewrite(model, args, kwargs, policy=policy)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded = _outputs(torch.export.load(buf).module()(*args, **kwargs))
        direct = _outputs(ep.module()(*args, **kwargs))
    assert sum(n.target is torch.ops.attnrw.condensed_attention.default for n in ep.graph.nodes) == 2
    assert all(torch.isfinite(t).all() for t in compiled + loaded)
    assert max((a - b).abs().max().item() for a, b in zip(compiled, ref)) > 1e-4, "condensing must change the result"
    assert max((a - b).abs().max().item() for a, b in zip(loaded, direct)) <= 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_models_with_covering_window_equal_dense(name):
    from tests.zoo import ZOO

    model, args, kwargs = ZOO[name]()
    reports: list[attnrw.Report] = []
    with torch.no_grad():
        ref = _outputs(model(*args, **kwargs))
        torch._dynamo.reset()
        policy = attnrw.Condense(recent=64, group=2, sinks=1, pooling="query", size_bias=True, block_size=4)
        backend = attnrw.backend(policy, on_report=reports.append, inner="eager")
        out = _outputs(torch.compile(model, backend=backend)(*args, **kwargs))
    assert [d.op for r in reports for d in r.decisions] == ["condensed_attention"] * 2
    assert max((a - b).abs().max().item() for a, b in zip(out, ref)) <= 1e-5
