"""Tests of ``torch.ops.attnrw.merged_attention`` (ToMe / MaMe-MaRe / SAT token merging).

The oracle is written here from the documented rule alone (it shares no code
with ``attnrw.kernels.merge``): bipartite soft matching redone per batch
element with Python lists of member positions in float64, merged tensors as
means over those lists, the bias as a log-sum-exp of the members' mask
entries, and textbook softmax attention in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnrw
from attnrw.errors import ImplementationUnavailableError
from attnrw.kernels.merge import MergePlan, attention_with_plan, merge_plan, merged_attention_torch
from attnrw.kernels.merge import reference as merge_reference
from tests.kernels.test_sparse import _run_script  # one subprocess helper for the kernel tests

op = torch.ops.attnrw.merged_attention

BATCH, HEADS, KV_HEADS, DIM = 2, 4, 2, 16
NEG = float("-inf")


# ----------------------------------------------------------------------------- oracle


def oracle_count(n: int, ratio: float, r: int) -> int:
    """Tokens asked to be merged away: r, or round(ratio · n) with halves up."""
    return min(n, r if r >= 0 else math.floor(ratio * n + 0.5))


def oracle_padding(mask: torch.Tensor | None, batch: int, n: int) -> list[list[bool]]:
    """Per batch element and key: forbidden for every head and query (bool False, float <= -1e4)."""
    if mask is None:
        return [[False] * n for _ in range(batch)]
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    m = m.expand(batch, m.shape[1], m.shape[2], n)
    forbidden = ~m if m.dtype == torch.bool else m <= -1e4
    return [[bool(forbidden[b, :, :, j].all()) for j in range(n)] for b in range(batch)]


def oracle_groups(
    k: torch.Tensor, mask: torch.Tensor | None, ratio: float, r: int, protect: list[int]
) -> list[list[list[int]]]:
    """Per batch element, the merged tokens as lists of original positions, in token order."""
    batch, _, n, _ = k.shape
    want = oracle_count(n, ratio, r)
    metric = k.double().mean(1)
    pad = oracle_padding(mask, batch, n)
    groups = [[[j] for j in range(n)] for _ in range(batch)]

    def unit(b: int, members: list[int]) -> torch.Tensor:
        x = metric[b, members].mean(0)
        return x / max(float(x.norm()), 1e-12)

    def is_protected(members: list[int]) -> bool:
        return len(members) == 1 and members[0] in protect

    merged = 0
    while merged < want and all(len(g) >= 2 for g in groups):
        choices = []  # per batch element: (A place, B place, similarity) for eligible A tokens
        for b, toks in enumerate(groups):
            a_places, b_places = range(0, len(toks), 2), range(1, len(toks), 2)
            cand = []
            for ap in a_places:
                if is_protected(toks[ap]):
                    continue
                best, best_bp = NEG, None
                for bp in b_places:
                    if is_protected(toks[bp]) or pad[b][toks[bp][0]] != pad[b][toks[ap][0]]:
                        continue
                    sim = float(unit(b, toks[ap]) @ unit(b, toks[bp]))
                    if sim > best:  # first maximum wins
                        best, best_bp = sim, bp
                if best_bp is not None:
                    cand.append((ap, best_bp, best))
            # Highest similarity first; equal ones: earlier A token first.
            choices.append(sorted(cand, key=lambda c: (-c[2], c[0])))
        step = min(want - merged, min(len(c) for c in choices))
        if step == 0:
            break
        for b, cand in enumerate(choices):
            toks = groups[b]
            sources = set()
            for ap, bp, _ in cand[:step]:
                toks[bp] = toks[bp] + toks[ap]
                sources.add(ap)
            groups[b] = [t for i, t in enumerate(toks) if i not in sources]
        merged += step
    return groups


def plan_groups(plan: MergePlan) -> list[list[list[int]]]:
    """The plan's merged tokens as sorted member lists, per batch element, in slot order."""
    out = []
    for b in range(plan.index.shape[0]):
        slots = [[] for _ in range(plan.num_tokens)]
        for j, s in enumerate(plan.index[b].tolist()):
            slots[s].append(j)
        out.append(slots)
    return out


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    groups: list[list[list[int]]],
    mode: str,
) -> torch.Tensor:
    """Float64 proportional attention over the merged tokens of ``groups``; differentiable in q, k, v, mask."""
    batch, heads, q_len, _ = q.shape
    n = k.shape[-2]
    rep = heads // k.shape[1]
    outs = []
    for b in range(batch):
        toks = groups[b]
        kd = k[b].double().repeat_interleave(rep, 0)
        vd = v[b].double().repeat_interleave(rep, 0)
        km = torch.stack([kd[:, t].mean(1) for t in toks], 1)  # (H, M, D)
        vm = torch.stack([vd[:, t].mean(1) for t in toks], 1)
        if mask is None:
            madd = torch.zeros(heads, q_len, n, dtype=torch.float64)
        else:
            m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            m = m.expand(batch, heads, q_len, n)[b]
            madd = torch.where(m, 0.0, NEG).double() if m.dtype == torch.bool else m.double()
        bias = torch.stack([torch.logsumexp(madd[:, :, t], dim=-1) for t in toks], -1)  # (H, Sq, M)
        qd = q[b].double()
        if mode == "qkv":
            qd = torch.stack([qd[:, t].mean(1) for t in toks], 1)
            bias = torch.stack([bias[:, t].mean(1) for t in toks], 1)  # mean of the members' rows
        s = qd @ km.transpose(-1, -2) * scale + bias
        seen = (bias > NEG).any(-1, keepdim=True)
        p = torch.softmax(torch.where(seen, s, 0.0), dim=-1) * seen
        o = p @ vm
        if mode == "qkv":
            where = [0] * n
            for m_i, t in enumerate(toks):
                for j in t:
                    where[j] = m_i
            o = o[:, where]
        outs.append(o)
    return torch.stack(outs)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Plain SDPA with GQA heads repeated."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=scale
    )


def make_inputs(
    q_len: int, kv_len: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0, dim: int = DIM
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (BATCH, HEADS, q_len, dim), k and v (BATCH, KV_HEADS, kv_len, dim): GQA with 2 query heads per kv head."""
    kv_len = q_len if kv_len is None else kv_len
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, q_len, dim, generator=g).to(dtype)
    k = torch.randn(BATCH, KV_HEADS, kv_len, dim, generator=g).to(dtype)
    v = torch.randn(BATCH, KV_HEADS, kv_len, dim, generator=g).to(dtype)
    return q, k, v


def make_mask(kind: str, q_len: int, kv_len: int | None = None, seed: int = 1) -> torch.Tensor | None:
    """A mask of one of the shapes and kinds models pass (see each branch)."""
    kv_len = q_len if kv_len is None else kv_len
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "padding":  # key padding, bool (batch, 1, 1, S): the second sequence is ~2/3 long
        m = torch.ones(BATCH, 1, 1, kv_len, dtype=torch.bool)
        m[1, ..., max(1, 2 * kv_len // 3) :] = False
        return m
    if kind == "hf-padding":  # HF's expanded additive padding mask, (batch, 1, Sq, Sk) with finfo.min
        m = torch.zeros(BATCH, 1, q_len, kv_len)
        m[1, ..., max(1, kv_len // 2) :] = torch.finfo(torch.float32).min
        return m
    if kind == "additive":  # a per-head additive bias broadcast over the batch, (heads, Sq, Sk)
        return torch.randn(HEADS, q_len, kv_len, generator=g)
    if kind == "bool":  # a general boolean mask, (batch, heads, Sq, Sk)
        return torch.rand(BATCH, HEADS, q_len, kv_len, generator=g) > 0.3
    raise ValueError(kind)


# ----------------------------------------------------------------------------- plan


@pytest.mark.parametrize("mask_kind", ["none", "padding", "hf-padding"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("n", [2, 17, 40])
def test_plan_matches_oracle_groups(n, ratio, mask_kind):
    _, k, _ = make_inputs(n)
    mask = make_mask(mask_kind, n)
    plan = merge_plan(k, mask, ratio, -1, [0, 3])
    want = oracle_groups(k, mask, ratio, -1, [0, 3])
    assert plan_groups(plan) == [[sorted(t) for t in toks] for toks in want]
    assert plan.sizes.tolist() == [[len(t) for t in toks] for toks in want]


@pytest.mark.parametrize("protect", [[0], [], [1, 2, 7], [0, 5, 1000]])
@pytest.mark.parametrize("n", [16, 17, 64, 256])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_token_count_sizes_and_protect(ratio, n, protect):
    _, k, _ = make_inputs(n, seed=n)
    plan = merge_plan(k, None, ratio, -1, protect)
    kept = [p for p in protect if p < n]
    want = math.floor(ratio * n + 0.5)
    if ratio <= 0.75:
        assert plan.num_merged == want
        # Attention runs on about ceil((1 - ratio) · N) tokens (ratio · N is rounded: one off at most).
        assert abs(plan.num_tokens - math.ceil((1 - ratio) * n)) <= 1
    else:
        # Rounds may stop early, only when no unprotected A token has an unprotected B partner left.
        assert plan.num_merged <= want
        if plan.num_merged < want:
            for toks in plan_groups(plan):
                free = [i for i, t in enumerate(toks) if not (len(t) == 1 and t[0] in kept)]
                assert len({i % 2 for i in free}) <= 1, toks
    assert plan.num_tokens == n - plan.num_merged
    assert plan.sizes.sum(1).tolist() == [n] * BATCH
    assert int(plan.sizes.min()) >= 1
    for p in kept:
        slot = plan.index[:, p]
        assert plan.sizes.gather(1, slot[:, None]).flatten().tolist() == [1] * BATCH
        assert ((plan.index == slot[:, None]).sum(1) == 1).all()


def test_attention_runs_on_merged_tokens(monkeypatch):
    """Count the keys the attention part really sees, through the op."""
    seen: list[tuple[int, int]] = []
    real = merge_reference.attend_torch

    def spy(q, k, v, bias, scale):
        seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, bias, scale)

    monkeypatch.setattr(merge_reference, "attend_torch", spy)
    from attnrw.kernels.merge import op as merge_op

    monkeypatch.setattr(merge_op, "attend_torch", spy)
    n = 64
    q, k, v = make_inputs(n)
    op(q, k, v, None, False, 0.25, 0.5, -1, "kv", [0], "torch")
    op(q, k, v, None, False, 0.25, 0.5, -1, "qkv", [0], "torch")
    op(q, k, v, None, False, 0.25, 0.0, 10, "kv", [], "torch")
    assert seen == [(n, 32), (32, 32), (n, n - 10)]


def test_padding_never_merges_with_real_tokens():
    n = 40
    _, k, _ = make_inputs(n)
    mask = make_mask("padding", n)
    plan = merge_plan(k, mask, 0.75, -1, [0])
    pad = ~mask[:, 0, 0, :]
    for b in range(BATCH):
        for members in plan_groups(plan)[b]:
            assert len({bool(pad[b, j]) for j in members}) == 1, members


def test_identical_padding_keys_tie_break():
    """Padding tokens often share one key (ties); the choice is still the documented one."""
    n = 30
    _, k, _ = make_inputs(n)
    mask = make_mask("padding", n)
    k[1, :, 20:] = 0.5  # identical padding keys
    k[1, :, 25:] = 0.0  # and zero ones (cosine 0)
    for ratio in (0.3, 0.6):
        plan = merge_plan(k, mask, ratio, -1, [])
        want = oracle_groups(k, mask, ratio, -1, [])
        assert plan_groups(plan) == [[sorted(t) for t in toks] for toks in want]


# ----------------------------------------------------------------------------- forward vs oracle

FORWARD_CASES = [
    # (mode, q_len, kv_len, ratio, r, mask_kind, protect)
    ("kv", 17, 17, 0.5, -1, "none", [0]),
    ("kv", 40, 40, 0.3, -1, "padding", [0]),
    ("kv", 40, 40, 0.7, -1, "hf-padding", [0, 1]),
    ("kv", 33, 33, 0.5, -1, "additive", [0]),
    ("kv", 32, 32, 0.0, 9, "bool", []),
    ("kv", 1, 1, 0.5, -1, "none", [0]),
    ("kv", 2, 2, 0.0, 1, "padding", []),
    ("kv", 9, 24, 0.5, -1, "padding", [0]),  # cross-attention: Sq != Sk
    ("kv", 13, 30, 0.6, -1, "additive", [2]),
    ("qkv", 17, 17, 0.5, -1, "none", [0]),
    ("qkv", 40, 40, 0.3, -1, "padding", [0]),
    ("qkv", 40, 40, 0.6, -1, "hf-padding", [0]),
    ("qkv", 33, 33, 0.5, -1, "additive", [0, 4]),
    ("qkv", 32, 32, 0.0, 20, "bool", []),
    ("qkv", 1, 1, 0.5, -1, "none", []),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_forward_matches_oracle(case):
    mode, q_len, kv_len, ratio, r, mask_kind, protect = case
    q, k, v = make_inputs(q_len, kv_len)
    mask = make_mask(mask_kind, q_len, kv_len)
    out = op(q, k, v, mask, False, 0.3, ratio, r, mode, protect, "torch")
    assert out.shape == (BATCH, HEADS, q_len, DIM) and out.dtype == torch.float32
    # Laid out like SDPA's output, so the usual transpose(1, 2) after it is contiguous.
    assert out.transpose(1, 2).is_contiguous()
    ref = oracle_attention(q, k, v, mask, 0.3, oracle_groups(k, mask, ratio, r, protect), mode)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    # The merge is not vacuous: the result differs from dense attention.
    if q_len > 2 and (r > 0 or ratio > 0):
        assert (out - dense(q, k, v, mask, 0.3)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["kv", "qkv"])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "hf-padding", "additive", "bool"])
def test_nothing_merged_is_dense(mode, mask_kind):
    q, k, v = make_inputs(37)
    mask = make_mask(mask_kind, 37)
    want = torch.ops.attnrw.attention(q, k, v, mask, False, 0.25)
    for ratio, r in ((0.0, -1), (0.01, -1), (0.7, 0)):  # round(0.01 · 37) = 0
        out = op(q, k, v, mask, False, 0.25, ratio, r, mode, [0], "torch")
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["kv", "qkv"])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "additive"])
def test_sizes_one_proportional_attention_is_dense(mode, mask_kind):
    """The merged path with a plan of all sizes 1 (bias = the mask, log 1 = 0) is dense attention."""
    q, k, v = make_inputs(29)
    mask = make_mask(mask_kind, 29)
    identity = MergePlan(torch.arange(29).expand(BATCH, 29).contiguous(), torch.ones(BATCH, 29, dtype=torch.int64))
    out = attention_with_plan(q, k, v, mask, 0.25, identity, mode)
    torch.testing.assert_close(out, dense(q, k, v, mask, 0.25), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["kv", "qkv"])
def test_merging_duplicates_preserves_attention(mode):
    """Tokens in identical pairs merge pairwise; proportional attention then equals dense attention."""
    n = 24
    q, k, v = make_inputs(n)
    for t in (q, k, v):
        t[:, :, 1::2] = t[:, :, 0::2]  # token 2i+1 duplicates token 2i
    out = op(q, k, v, None, False, 0.25, 0.5, -1, mode, [], "torch")
    plan = merge_plan(k, None, 0.5, -1, [])
    assert plan.num_tokens == n // 2
    assert plan_groups(plan)[0] == [[2 * i, 2 * i + 1] for i in range(n // 2)]
    torch.testing.assert_close(out, dense(q, k, v, None, 0.25), atol=1e-5, rtol=0)


def test_merged_key_forbidden_only_where_all_members_are():
    """A query that may see one member of a merged key sees the merged key, with log(#allowed) bias."""
    q, k, v = make_inputs(6)
    k[:, :, 1] = k[:, :, 0] * 2  # tokens 0 and 1 have the same direction: they merge first
    mask = torch.ones(BATCH, HEADS, 6, 6, dtype=torch.bool)
    mask[:, :, 2, 0] = False  # query 2 may see only token 1 of the pair
    mask[:, :, 3, :2] = False  # query 3 sees neither
    out = op(q, k, v, mask, False, 0.25, 0.0, 1, "kv", [], "torch")
    plan = merge_plan(k, mask, 0.0, 1, [])
    assert plan_groups(plan)[0][0] == [0, 1]
    ref = oracle_attention(q, k, v, mask, 0.25, plan_groups(plan), "kv")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_rows_without_keys_are_zero():
    q, k, v = make_inputs(20)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    mask[..., 5, :] = False
    for mode in ("kv", "qkv"):
        out = op(q, k, v, mask, False, 0.25, 0.5, -1, mode, [0], "torch")
        assert torch.isfinite(out).all()
        if mode == "kv":
            assert torch.all(out[:, :, 5] == 0)


@pytest.mark.parametrize(
    "dtype, atol",
    [
        # Inputs, merged tensors and output are rounded to 11 (fp16) / 8 (bf16) significant
        # bits; means, bias and softmax run in fp32. Outputs are O(1): a few output ulps.
        (torch.float16, 4e-3),
        (torch.bfloat16, 3e-2),
    ],
)
@pytest.mark.parametrize("mode", ["kv", "qkv"])
def test_half_precision(mode, dtype, atol):
    q, k, v = make_inputs(40, dtype=dtype)
    mask = make_mask("padding", 40)
    out = op(q, k, v, mask, False, 0.25, 0.5, -1, mode, [0], "torch")
    assert out.dtype == dtype
    # The plan is matched on the half keys (upcast), as the op does.
    ref = oracle_attention(q, k, v, mask, 0.25, plan_groups(merge_plan(k, mask, 0.5, -1, [0])), mode)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- gradients, registration

GRAD_CASES = [
    ("kv", 25, 25, 0.5, "none"),
    ("kv", 30, 30, 0.4, "additive"),
    ("kv", 11, 30, 0.6, "padding"),
    ("qkv", 25, 25, 0.5, "none"),
    ("qkv", 30, 30, 0.4, "additive"),
    ("qkv", 30, 30, 0.5, "hf-padding"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradients_match_oracle(case):
    mode, q_len, kv_len, ratio, mask_kind = case
    q, k, v = (t.requires_grad_() for t in make_inputs(q_len, kv_len))
    mask = make_mask(mask_kind, q_len, kv_len)
    if mask is not None and mask.is_floating_point():
        mask.requires_grad_()
    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    out = op(q, k, v, mask, False, 0.25, ratio, -1, mode, [0], "torch")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    # The selection is a constant: the oracle differentiates through means, bias and attention only.
    groups = oracle_groups(k.detach(), None if mask is None else mask.detach(), ratio, -1, [0])
    ref = oracle_attention(q, k, v, mask, 0.25, groups, mode)
    want = torch.autograd.grad(ref, leaves, grad_out.double())
    for name, a, b in zip(["q", "k", "v", "mask"], got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def test_gradients_when_nothing_merged():
    q, k, v = (t.requires_grad_() for t in make_inputs(20))
    mask = torch.randn(20, 20, requires_grad=True)
    out = op(q, k, v, mask, False, 0.25, 0.0, 0, "qkv", [0], "torch")
    got = torch.autograd.grad(out.sum(), [q, k, v, mask])
    want = torch.autograd.grad(dense(q, k, v, mask, 0.25).sum(), [q, k, v, mask])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, mask_kind", [("kv", "additive"), ("qkv", "hf-padding"), ("kv", "padding")])
def test_opcheck(mode, mask_kind):
    q, k, v = (t.requires_grad_() for t in make_inputs(19))
    mask = make_mask(mask_kind, 19)
    if mask.is_floating_point():
        mask.requires_grad_()
    torch.library.opcheck(op, (q, k, v, mask, False, 0.25, 0.5, -1, mode, [0], "torch"))


def test_fake_shapes_and_layout():
    with torch._subclasses.fake_tensor.FakeTensorMode():
        q = torch.empty(2, 4, 33, 16)
        k = torch.empty(2, 2, 40, 16)
        v = torch.empty(2, 2, 40, 24)
        out = op(q, k, v, None, False, 0.25, 0.5, -1, "kv", [0], "auto")
        assert out.shape == (2, 4, 33, 24) and out.transpose(1, 2).is_contiguous()


def test_rejects_bad_arguments():
    q, k, v = make_inputs(10)
    with pytest.raises(ValueError, match="is_causal"):
        op(q, k, v, None, True, 0.25, 0.5, -1, "kv", [0], "torch")
    with pytest.raises(ValueError, match="q_len == kv_len"):
        op(q[:, :, :5], k, v, None, False, 0.25, 0.5, -1, "qkv", [0], "torch")
    with pytest.raises(ValueError, match="mode"):
        op(q, k, v, None, False, 0.25, 0.5, -1, "tokens", [0], "torch")
    with pytest.raises(ValueError, match="ratio"):
        op(q, k, v, None, False, 0.25, 1.0, -1, "kv", [0], "torch")
    with pytest.raises(ValueError, match="r must be"):
        op(q, k, v, None, False, 0.25, 0.5, -2, "kv", [0], "torch")
    with pytest.raises(ValueError, match="protect"):
        op(q, k, v, None, False, 0.25, 0.5, -1, "kv", [-1], "torch")
    with pytest.raises(ValueError, match="impl"):
        op(q, k, v, None, False, 0.25, 0.5, -1, "kv", [0], "cuda")
    with pytest.raises(ValueError, match="broadcast"):
        op(q, k, v, torch.ones(3, 10, dtype=torch.bool), False, 0.25, 0.5, -1, "kv", [0], "torch")
    with torch._subclasses.fake_tensor.FakeTensorMode():
        qf = torch.empty(1, 2, 8, 16)
        with pytest.raises(ValueError, match="is_causal"):
            op(qf, qf, qf, None, True, 0.25, 0.5, -1, "kv", [0], "auto")


def test_triton_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_inputs(8)
    with pytest.raises(ImplementationUnavailableError, match="TRITON_INTERPRET"):
        op(q, k, v, None, False, 0.25, 0.5, -1, "kv", [0], "triton")


def test_schema_is_the_rewriters():
    assert str(torch.ops.attnrw.merged_attention.default._schema) == (
        "attnrw::merged_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal, float scale, "
        "float ratio, int r, str mode, int[] protect, str impl) -> Tensor"
    )


def test_merge_step_is_exported_as_one_op():
    class Site(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.ops.attnrw.merged_attention(q, k, v, mask, False, 0.25, 0.5, -1, "kv", [0], "auto")

    q, k, v = make_inputs(16)
    mask = make_mask("padding", 16)
    ep = torch.export.export(Site(), (q, k, v, mask))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.attnrw.merged_attention.default]
    torch.testing.assert_close(ep.module()(q, k, v, mask), Site()(q, k, v, mask))


# ----------------------------------------------------------------------------- Triton (interpreter)


def test_torch_path_needs_no_triton():
    """impl='torch'/'auto' run with triton blocked; an explicit 'triton' then says why it cannot run."""
    out = _run_script(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now fails
        import attnrw, torch
        q = torch.randn(1, 2, 20, 16)
        for impl in ("torch", "auto"):
            torch.ops.attnrw.merged_attention(q, q, q, None, False, 0.25, 0.5, -1, "qkv", [0], impl)
        try:
            torch.ops.attnrw.merged_attention(q, q, q, None, False, 0.25, 0.5, -1, "kv", [0], "triton")
        except attnrw.ImplementationUnavailableError as e:
            print("unavailable:", e)
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    assert "unavailable: triton could not be imported" in out


# Per-dtype bounds of |triton - torch| on the same merged inputs. fp32: the interpreter's
# dots are IEEE fp32; only the summation order differs (~1e-7 relative). fp16: the kernel
# rounds probabilities to fp16 before the P·V dot (as flash attention does) and both round
# the output to 11 bits: a few 1e-3. bf16: 8 significant bits, outputs O(1): ~1e-2.
TRITON_BOUNDS = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 4e-2}

TRITON_CASES = {
    # id: (mode, q_len, kv_len, dtype, ratio, mask_kind, head_dim)
    "kv-fp32-none-37": ("kv", 37, 37, "float32", 0.5, "none", 16),
    "kv-fp32-padding-cross-20x50": ("kv", 20, 50, "float32", 0.5, "padding", 32),
    "kv-fp32-additive-headdim40-33": ("kv", 33, 33, "float32", 0.4, "additive", 40),
    "kv-fp32-bool-dense-30": ("kv", 30, 30, "float32", 0.0, "bool", 16),
    "qkv-fp32-hf-padding-40": ("qkv", 40, 40, "float32", 0.5, "hf-padding", 16),
    "qkv-fp32-additive-1": ("qkv", 1, 1, "float32", 0.5, "additive", 16),
    "kv-fp16-padding-40": ("kv", 40, 40, "float16", 0.5, "padding", 16),
    "qkv-bf16-additive-40": ("qkv", 40, 40, "bfloat16", 0.5, "additive", 16),
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
        from test_merge import make_inputs, make_mask
        import attnrw
        op = torch.ops.attnrw.merged_attention
        results = {{}}
        for name, (mode, q_len, kv_len, dtype, ratio, mask_kind, dim) in json.loads({cases!r}).items():
            dt = getattr(torch, dtype)
            q, k, v = make_inputs(q_len, kv_len, dt, dim=dim)
            mask = make_mask(mask_kind, q_len, kv_len)
            if mask is not None and mask.is_floating_point():
                mask = mask.to(dt)
            a = op(q, k, v, mask, False, dim ** -0.5, ratio, -1, mode, [0], "torch")
            b = op(q, k, v, mask, False, dim ** -0.5, ratio, -1, mode, [0], "triton")
            assert b.dtype == dt and b.shape == a.shape and b.transpose(1, 2).is_contiguous()
            results[name] = (a.double() - b.double()).abs().max().item()
        # Gradients after the Triton forward (the backward is the PyTorch recomputation).
        q, k, v = (t.requires_grad_() for t in make_inputs(30))
        out = op(q, k, v, None, False, 0.25, 0.5, -1, "qkv", [0], "triton")
        out.sum().backward()
        ref = op(q.detach(), k.detach(), v.detach(), None, False, 0.25, 0.5, -1, "qkv", [0], "torch")
        results["op-triton-fp32"] = (out.detach().double() - ref.double()).abs().max().item()
        results["op-triton-grad-finite"] = float(not all(torch.isfinite(t.grad).all() for t in (q, k, v)))
        # Merge(mode="tokens"): two sites, the second on the first one's merged tokens, padding mask.
        tok = torch.ops.attnrw.tokens_attention
        mask = make_mask("padding", 40, 40)
        worst = 0.0
        state = {{"torch": (None, None), "triton": (None, None)}}
        n = 40
        for site in range(2):
            q, k, v = make_inputs(n, n, torch.float32, dim=16)
            outs = {{}}
            for impl in ("torch", "triton"):
                index, sizes = state[impl]
                out, _, index, sizes = tok(q, k, v, mask, 0.25, 0.3, -1, [0], index, sizes, impl)
                outs[impl], state[impl] = out, (index, sizes)
            assert torch.equal(state["torch"][0], state["triton"][0])
            worst = max(worst, (outs["torch"].double() - outs["triton"].double()).abs().max().item())
            n = state["torch"][1].shape[1]
        results["tokens-triton-fp32"] = worst
        json.dump(results, open({str(path)!r}, "w"))
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", sorted(TRITON_CASES))
def test_triton_interpreter_matches_torch(triton_results, case):
    dtype = TRITON_CASES[case][3]
    assert triton_results[case] <= TRITON_BOUNDS[dtype], (case, triton_results[case])


def test_triton_through_op_with_backward(triton_results):
    assert triton_results["op-triton-fp32"] <= TRITON_BOUNDS["float32"]
    assert triton_results["op-triton-grad-finite"] == 0.0


def test_triton_tokens_mode_matches_torch(triton_results):
    """tokens_attention with impl='triton' over two chained sites: same plan, same outputs."""
    assert triton_results["tokens-triton-fp32"] <= TRITON_BOUNDS["float32"]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["kv", "qkv"])
def test_triton_gpu_matches_torch(mode, dtype):
    seq, dim = 1000, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, seq, dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(2, 2, seq, dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(2, 2, seq, dim, device="cuda", generator=g).to(dtype)
    mask = torch.ones(2, 1, 1, seq, dtype=torch.bool, device="cuda")
    mask[1, ..., 700:] = False
    a = op(q, k, v, mask, False, dim**-0.5, 0.5, -1, mode, [0], "torch")
    b = op(q, k, v, mask, False, dim**-0.5, 0.5, -1, mode, [0], "triton")
    assert b.dtype == dtype
    bound = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 4e-2}[dtype]  # fp32: GPU dots may reorder
    torch.testing.assert_close(a.double(), b.double(), atol=bound, rtol=0)
    assert attnrw.kernels.merge.op.resolve_attend("auto", q.device).__name__ == "biased_attention_triton"


def test_merged_attention_torch_is_the_op():
    q, k, v = make_inputs(21)
    a = merged_attention_torch(q, k, v, None, False, 0.25, 0.5, -1, "qkv", [0])
    torch.testing.assert_close(op(q, k, v, None, False, 0.25, 0.5, -1, "qkv", [0], "auto"), a)
