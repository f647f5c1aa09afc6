"""The ops of ``Merge(mode="tokens")``: tokens_attention, merge_tokens, restore_tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnrw  # noqa: F401  (registers the ops)
from attnrw.kernels.merge.plan import exact_count, merge_plan

ops = torch.ops.attnrw


def _qkv(b: int, h: int, t: int, d: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3)]


def _padding(b: int, n: int, pad: int) -> torch.Tensor:
    m = torch.ones(b, 1, 1, n, dtype=torch.bool)
    m[-1, ..., n - pad:] = False
    return m


def _chain(b: int, n: int, ratios: list[float], mask: torch.Tensor | None, protect: list[int], seed: int = 0):
    """Run tokens_attention site after site on fresh random q, k, v of the current length; yields each result."""
    index = sizes = None
    t = n
    for i, ratio in enumerate(ratios):
        q, k, v = _qkv(b, 2, t, seed=seed + i)
        out, step, index, sizes = ops.tokens_attention(q, k, v, mask, 0.3, ratio, -1, protect, index, sizes, "torch")
        yield (q, k, v), out, step, index, sizes
        t = sizes.shape[1]


@pytest.mark.parametrize("ratio, r", [(0.0, -1), (0.5, 0)])
def test_nothing_merged_is_dense(ratio: float, r: int) -> None:
    q, k, v = _qkv(2, 2, 12)
    mask = _padding(2, 12, 3)
    out, step, index, sizes = ops.tokens_attention(q, k, v, mask, 0.3, ratio, r, [0], None, None, "torch")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert torch.equal(out, ref)
    assert torch.equal(index, torch.arange(12).expand(2, 12)) and torch.equal(sizes, torch.ones(2, 12, dtype=torch.long))


def test_proportional_attention_with_all_sizes_one_is_dense() -> None:
    # A carried state that merged nothing: the merged path runs with log(1) = 0 biases.
    q, k, v = _qkv(2, 2, 10)
    index = torch.arange(10).expand(2, 10).contiguous()
    sizes = torch.ones(2, 10, dtype=torch.long)
    for mask in (None, _padding(2, 10, 2)):
        out, *_ = ops.tokens_attention(q, k, v, mask, 0.3, 0.0, -1, [0], index, sizes, "torch")
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, ratios", [(16, [0.25, 0.25, 0.5]), (33, [0.1, 0.4, 0.3]), (9, [0.5, 0.5, 0.5])])
def test_chain_invariants(n: int, ratios: list[float]) -> None:
    """Sizes sum to N, counts are exact, protected tokens stay alone, padding merges only with padding."""
    b, pad, protect = 3, 4, [0, 2]
    mask = _padding(b, n, pad)
    real = mask[:, 0, 0]
    t = n
    for ratio, (_, out, step, index, sizes) in zip(ratios, _chain(b, n, ratios, mask, protect)):
        assert sizes.shape[1] == t - exact_count(t, ratio, -1, len(protect))
        assert out.shape == (b, 2, sizes.shape[1], 8)
        assert torch.equal(sizes.sum(1), torch.full((b,), n))
        assert index.shape == (b, n) and int(index.max()) < sizes.shape[1]
        # step maps current tokens to merged ones, and composes with the previous index.
        assert step.shape == (b, t)
        counts = torch.zeros_like(sizes).scatter_add_(1, index, torch.ones_like(index))
        assert torch.equal(counts, sizes)
        for p in protect:
            assert torch.equal(sizes.gather(1, index[:, p:p + 1]), torch.ones(b, 1, dtype=torch.long))
        for bi in range(b):
            for slot in range(sizes.shape[1]):
                members = real[bi][index[bi] == slot]
                assert members.all() or not members.any(), "a merged token mixes padding and real tokens"
        t = sizes.shape[1]


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
def test_attention_runs_on_the_merged_count(ratio: float) -> None:
    n, protect = 40, [0]
    q, k, v = _qkv(2, 2, n)
    out, _, _, sizes = ops.tokens_attention(q, k, v, None, 0.3, ratio, -1, protect, None, None, "torch")
    want = exact_count(n, ratio, -1, len(protect))
    assert out.shape[2] == sizes.shape[1] == n - want
    if ratio <= 0.5:  # not clipped: about ceil((1 - ratio) * N) tokens (ratio * N rounded, one off at most)
        assert abs(out.shape[2] - (n - ratio * n)) <= 1


def test_fake_matches_real_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _qkv(2, 2, 20)
    mask = _padding(2, 20, 5)
    real = ops.tokens_attention(q, k, v, mask, 0.3, 0.3, -1, [0], None, None, "torch")
    with FakeTensorMode() as mode:
        fq, fk, fv, fm = (mode.from_tensor(x) for x in (q, k, v, mask))
        fake = ops.tokens_attention(fq, fk, fv, fm, 0.3, 0.3, -1, [0], None, None, "torch")
    for r, f in zip(real, fake):
        assert tuple(r.shape) == tuple(f.shape) and r.dtype == f.dtype and r.stride() == f.stride()


def _mean_of_members(x: torch.Tensor, index: torch.Tensor, m: int) -> torch.Tensor:
    """(B, N, F) original tokens -> (B, M, F): plain mean over members (the oracle of merge_tokens)."""
    out = torch.zeros(x.shape[0], m, x.shape[2], dtype=x.dtype)
    for b in range(x.shape[0]):
        for s in range(m):
            out[b, s] = x[b, index[b] == s].mean(0)
    return out


def test_merge_tokens_weighted_mean_composes() -> None:
    n, b = 18, 2
    states = [(index, sizes) for _, _, _, index, sizes in _chain(b, n, [0.3, 0.3], _padding(b, n, 3), [0])]
    (i1, s1), (i2, s2) = states
    x = torch.randn(b, n, 5, dtype=torch.float64)
    direct = ops.merge_tokens(x, None, None, i2, s2, 1, 0)
    torch.testing.assert_close(direct, _mean_of_members(x, i2, s2.shape[1]))
    via = ops.merge_tokens(ops.merge_tokens(x, None, None, i1, s1, 1, 0), i1, s1, i2, s2, 1, 0)
    torch.testing.assert_close(via, direct)


@pytest.mark.parametrize("layout", ["btc", "flat", "tbc", "heads", "batch1"])
def test_merge_and_restore_layouts(layout: str) -> None:
    n, b = 12, 2
    (_, _, _, index, sizes), = list(_chain(b, n, [0.4], None, [0]))
    m = sizes.shape[1]
    x = torch.randn(b, n, 6, dtype=torch.float64)
    want = _mean_of_members(x, index, m)
    if layout == "btc":
        args, to, back = (x, 1, 0), lambda y: y, lambda y: y
    elif layout == "flat":
        args, to, back = (x.reshape(b * n, 6), 0, 0), lambda y: y.view(b, -1, 6), lambda y: y.reshape(-1, 6)
    elif layout == "tbc":
        args, to, back = (x.transpose(0, 1), 0, 1), lambda y: y.transpose(0, 1), lambda y: y.transpose(0, 1)
    elif layout == "heads":  # batch axis holds batch × 2 heads, batch-major: (B·2, N, 3)
        xh = x.view(b, n, 2, 3).permute(0, 2, 1, 3).reshape(b * 2, n, 3)
        args = (xh, 1, 0)
        to = lambda y: y.view(b, 2, -1, 3).permute(0, 2, 1, 3).reshape(b, -1, 6)  # noqa: E731
        back = lambda y: y.view(b, -1, 2, 3).permute(0, 2, 1, 3).reshape(b * 2, -1, 3)  # noqa: E731
    else:  # a (1, N, C) operand (e.g. position embeddings) is broadcast over the batch
        x1 = x[:1]
        want = _mean_of_members(x1.expand(b, n, 6), index, m)
        args, to, back = (x1, 1, 0), lambda y: y, lambda y: y
    merged = ops.merge_tokens(args[0], None, None, index, sizes, args[1], args[2])
    torch.testing.assert_close(to(merged), want)
    restored = ops.restore_tokens(back(want), index, args[1], args[2])
    full = want.gather(1, index[..., None].expand(b, n, 6))
    torch.testing.assert_close(to(restored) if layout != "batch1" else restored, full)


def test_exact_plan_reaches_the_count_when_bipartite_rounds_stall() -> None:
    # Three real tokens at even places and padding at odd places: no A token has a B partner of its kind.
    n = 8
    k = torch.randn(1, 1, n, 4, dtype=torch.float64)
    mask = torch.tensor([True, False] * 4).view(1, 1, 1, n)
    plan = merge_plan(k, mask, 0.0, 4, [], exact=True)
    assert plan.num_tokens == n - 4
    real = mask.view(n)
    for s in range(plan.num_tokens):
        members = real[plan.index[0] == s]
        assert members.all() or not members.any()
    with pytest.raises(ValueError, match="no eligible pair"):
        merge_plan(k, mask, 0.0, 7, [], exact=True)


def test_padding_pairs_merge_first() -> None:
    n = 16
    q, k, v = _qkv(1, 2, n)
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    mask[..., 8:] = False  # 8 padding tokens
    _, _, index, sizes = ops.tokens_attention(q, k, v, mask, 0.3, 0.0, 4, [0], None, None, "torch")
    assert torch.equal(sizes[0, index[0, :8]], torch.ones(8, dtype=torch.long)), "a real token merged before padding"


def test_bad_inputs_are_value_errors() -> None:
    q, k, v = _qkv(2, 2, 8)
    with pytest.raises(ValueError, match="both index and sizes"):
        ops.tokens_attention(q, k, v, None, 0.3, 0.2, -1, [0], torch.zeros(2, 8, dtype=torch.long), None, "torch")
    with pytest.raises(ValueError, match="original token space"):
        ops.tokens_attention(q, k, v, torch.ones(2, 1, 1, 5, dtype=torch.bool), 0.3, 0.2, -1, [0], None, None, "torch")
    with pytest.raises(ValueError, match="one token set"):
        ops.tokens_attention(q, k[:, :, :5], v[:, :, :5], None, 0.3, 0.2, -1, [0], None, None, "torch")
    index = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="does not hold"):
        ops.restore_tokens(torch.randn(3, 5, 3), index, 1, 0)
