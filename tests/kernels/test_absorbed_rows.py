"""Rows whose every visible key a ``finfo.min`` mask hides (Hugging Face's additive masks, e.g. left padding).

In fp32 such a mask absorbs the scores, so ``F.scaled_dot_product_attention``
attends uniformly over the row's visible keys rather than not at all. The
ops must do what the dense attention they replace does: the PyTorch paths
(which compute a row as several parts merged by log-sum-exp) and the Triton
kernels (which keep mask values at or below -1e38 unscaled) alike. The
oracle of the sparse op is SDPA itself on the op's allowed set; the
condensed and merged ops are checked Triton against PyTorch.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from attnrw.kernels.sparse import sparse_attention_torch
from tests.kernels.test_sparse import _run_script, make_inputs, reference_allowed

SEQ = 40
#: (window, sinks, topk, block_size): one part (the window, sinks in its rows); sinks past a block and
#: top-k blocks (three parts merged by log-sum-exp).
SPARSE_CASES = {"one-part": (12, 3, 0, 8), "three-parts": (12, 10, 2, 8)}


def absorbed_mask(seq: int) -> torch.Tensor:
    """(2, 1, S, S) fp32 additive: batch 0 has whole rows at finfo.min; batch 1 finfo.min left padding."""
    low = torch.finfo(torch.float32).min
    m = torch.zeros(2, 1, seq, seq)
    m[0, :, [0, 7, 21, seq - 1], :] = low
    m[1, :, :, :6] = low  # left padding: its own rows see only padding keys when causal
    return m


@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_sparse_torch_path_is_sdpa_on_absorbed_rows(case, causal):
    window, sinks, topk, block = SPARSE_CASES[case]
    q, k, v = make_inputs(SEQ)
    mask = absorbed_mask(SEQ)
    out = sparse_attention_torch(q, k, v, mask, causal, 0.25, window, sinks, topk, block)
    allowed = reference_allowed(q, k, block, window, sinks, topk, causal)
    group = q.shape[1] // k.shape[1]
    dense_mask = mask.expand_as(allowed).masked_fill(~allowed, float("-inf"))
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=dense_mask, scale=0.25
    )
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    # The absorbed rows attend uniformly: their output is the mean of the values they see.
    vis = allowed[0, :, 7].double()
    mean = (vis[:, :, None] * v.repeat_interleave(group, 1)[0].double()).sum(1) / vis.sum(1, keepdim=True)
    torch.testing.assert_close(out[0, :, 7].double(), mean, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def triton_absorbed(tmp_path_factory) -> dict[str, float]:
    """Max |Triton - PyTorch| per case, in one interpreter subprocess (TRITON_INTERPRET set before triton loads)."""
    path = tmp_path_factory.mktemp("absorbed") / "results.json"
    _run_script(
        f"""
        import json, torch
        import attnrw
        from tests.kernels.test_sparse import make_inputs
        from tests.kernels.test_absorbed_rows import SEQ, SPARSE_CASES, absorbed_mask
        from attnrw.kernels.sparse.reference import sparse_attention_torch
        from attnrw.kernels.sparse.triton import sparse_attention_triton
        from attnrw.kernels.condense.reference import condensed_attention_torch
        from attnrw.kernels.condense.triton import condensed_attention_triton
        from attnrw.kernels.merge.reference import merged_attention_torch, attend_torch
        from attnrw.kernels.merge.triton import biased_attention_triton
        q, k, v = make_inputs(SEQ)
        mask = absorbed_mask(SEQ)
        results = {{}}
        def diff(a, b):
            return (a.double() - b.double()).abs().max().item()
        for causal in (False, True):
            for name, (window, sinks, topk, block) in SPARSE_CASES.items():
                args = (q, k, v, mask, causal, 0.25, window, sinks, topk, block)
                results[f"sparse-{{name}}-{{causal}}"] = diff(sparse_attention_torch(*args), sparse_attention_triton(*args))
            for pooling in ("mean", "query"):
                args = (q, k, v, mask, causal, 0.25, 12, 5, 3, pooling, True, 16)
                a, b = condensed_attention_torch(*args), condensed_attention_triton(*args)
                results[f"condense-{{pooling}}-{{causal}}"] = diff(a, b)
        for mode in ("kv", "qkv"):
            args = (q, k, v, mask, False, 0.25, 0.3, -1, mode, [0])
            a = merged_attention_torch(*args, attend=attend_torch)
            b = merged_attention_torch(*args, attend=biased_attention_triton)
            results[f"merge-{{mode}}"] = diff(a, b)
        # Without the guard the Triton kernels gave 0 on these rows: they must not.
        out = biased_attention_triton(q, k, v, mask, 0.25)
        results["merge-row-norm"] = out[0, :, 7].abs().amax().item()
        json.dump(results, open({str(path)!r}, "w"))
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    return json.loads(path.read_text())


CASES = [f"sparse-{n}-{c}" for n in SPARSE_CASES for c in (False, True)]
CASES += [f"condense-{p}-{c}" for p in ("mean", "query") for c in (False, True)] + ["merge-kv", "merge-qkv"]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_torch_on_absorbed_rows(triton_absorbed, case):
    assert triton_absorbed[case] <= 1e-5, (case, triton_absorbed[case])  # fp32, IEEE dots: summation order only


def test_triton_attends_on_absorbed_rows(triton_absorbed):
    assert triton_absorbed["merge-row-norm"] > 1e-3

