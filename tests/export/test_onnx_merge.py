"""``attnrw::merged_attention`` -> ONNX: the in-graph merge plan and merged attention, against the op in PyTorch.

The plan is a discrete choice, so an output within 1e-5 of the op's means
onnxruntime merged exactly the same tokens (a single different pair moves
the output by far more on these random inputs); ``_merged`` checks that each
case merges what it is meant to. Case names say how many matching rounds the
reference runs (checked by hand: a round is one ``cumsum`` in ``merge_plan``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnrw
from attnrw.errors import ConfigError
from attnrw.export import seq_dynamic_shapes, to_onnx, translation_table
from attnrw.export.merge import check_exportable
from attnrw.kernels.merge import merge_plan
from tests.export.sites import check_text_model_at, make_mask, onnx_ops, qkv, run_onnx
from tests.zoo import ZOO

#: fp32 onnxruntime vs the op's fp32 PyTorch path, same plan: summation orders only (observed <= 1e-6).
ATOL = 1e-5
#: Whole models (2 layers, LayerNorms): the bound of to_onnx's own verification.
MODEL_ATOL = 1e-4


class MergeSite(torch.nn.Module):
    """``attnrw::merged_attention`` with fixed ratio / r, mode and protected positions."""

    def __init__(self, mode: str = "kv", ratio: float = 0.3, r: int = -1, protect=(0,), scale: float = 0.3) -> None:
        super().__init__()
        self.mode, self.ratio, self.r, self.protect, self.scale = mode, ratio, r, list(protect), scale

    def forward(self, q, k, v, mask=None):
        return torch.ops.attnrw.merged_attention(
            q, k, v, mask, False, self.scale, self.ratio, self.r, self.mode, self.protect, "torch"
        )


def _merged(site: MergeSite, k: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many tokens the reference plan merges away for these keys."""
    return merge_plan(k, mask, site.ratio, site.r, site.protect).num_merged


def _padding(batch: int, seq: int, pads: list[int], kind: str, heads: int = 1, full_rows: bool = False) -> torch.Tensor:
    """A key padding mask: row b hides its last ``pads[b]`` keys; bool, or additive with finfo.min (HF eager)."""
    keep = torch.ones(batch, seq, dtype=torch.bool)
    for b, p in enumerate(pads):
        if p:
            keep[b, seq - p:] = False
    m = keep[:, None, None, :].expand(batch, heads, seq if full_rows else 1, seq)
    if kind == "bool":
        return m.contiguous()
    return torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)


class Sites(torch.nn.Module):
    """Several merge sites, each on its own inputs, in one program: one export checks many cases."""

    def __init__(self, sites: list[MergeSite], arities: list[int]) -> None:
        super().__init__()
        self.sites = torch.nn.ModuleList(sites)
        self.arities = arities

    def forward(self, *tensors):
        outs, i = [], 0
        for site, n in zip(self.sites, self.arities):
            outs.append(site(*tensors[i:i + n]))
            i += n
        return tuple(outs)


# (mode, ratio, r, protect, heads, kv_heads, seq, mask) — mask: None, or (kind, builder args).
CASES = {
    "kv": ("kv", 0.3, -1, (0,), 2, 2, 13, None),
    "qkv": ("qkv", 0.3, -1, (0,), 2, 2, 13, None),
    "gqa": ("kv", 0.3, -1, (), 4, 2, 12, None),  # the metric is the mean over kv heads
    "qkv-gqa-2-rounds": ("qkv", 0.5, -1, (0,), 4, 2, 12, None),
    "count": ("qkv", 0.0, 3, (0, 5), 2, 2, 11, None),  # r, two protected positions
    "2-rounds": ("kv", 0.49, -1, (0,), 2, 2, 10, None),  # 5 asked, 4 eligible in round 1
    "3-rounds": ("qkv", 0.75, -1, (0,), 2, 2, 16, None),  # above one half
    "kv-pad-bool": ("kv", 0.4, -1, (0,), 2, 2, 14, ("bool", [0, 4], False)),  # padding merges only with padding
    "qkv-rows-bool": ("qkv", 0.4, -1, (0,), 2, 2, 14, ("bool", [3, 0], True)),  # (B, 1, S, S): merged bias rows
    "kv-hf-eager": ("kv", 0.4, -1, (0,), 2, 2, 14, ("float", [5, 2], True)),  # additive finfo.min
    "qkv-pad-float-2-rounds": ("qkv", 0.6, -1, (0,), 2, 2, 15, ("float", [4, 1], False)),
    "qkv-random-float": ("qkv", 0.3, -1, (), 2, 2, 12, ("random-float", (2, 2, 12, 12))),  # -inf, per head
    "kv-random-bool-2d": ("kv", 0.3, -1, (0,), 2, 2, 12, ("random-bool", (12, 12))),  # rows that see nothing
}
GROUPS = {
    "no-mask": (23, ["kv", "qkv", "gqa", "qkv-gqa-2-rounds", "count", "2-rounds", "3-rounds"]),
    "masks": (23, ["kv-pad-bool", "qkv-rows-bool", "kv-hf-eager", "qkv-pad-float-2-rounds", "qkv-random-float",
                   "kv-random-bool-2d"]),
    "opset18": (18, ["qkv-gqa-2-rounds", "3-rounds", "qkv-pad-float-2-rounds", "qkv-random-float"]),
}


def _inputs(heads, kv_heads, seq, mask_spec, seed=0):
    q, k, v = qkv(2, heads, kv_heads, seq, dim=8, v_dim=6, seed=seed)
    if mask_spec is None:
        return (q, k, v), None
    kind = mask_spec[0]
    if kind.startswith("random-"):
        mask = make_mask(kind.split("-")[1], mask_spec[1])
    else:
        mask = _padding(2, seq, mask_spec[1], kind, full_rows=mask_spec[2])
    return (q, k, v, mask), mask


@pytest.mark.parametrize("group", list(GROUPS))
def test_merge_matches_op(tmp_path, group):
    """Each case of the group is one site of one exported program (so also several Loops in one graph)."""
    opset, names = GROUPS[group]
    sites, inputs, arities = [], [], []
    for seed, name in enumerate(names):
        mode, ratio, r, protect, heads, kv_heads, seq, mask_spec = CASES[name]
        site = MergeSite(mode, ratio, r, protect)
        args, mask = _inputs(heads, kv_heads, seq, mask_spec, seed=seed)
        assert _merged(site, args[1], mask) > 0, name
        sites.append(site)
        inputs.extend(args)
        arities.append(len(args))
    model, args = Sites(sites, arities), tuple(inputs)
    path = to_onnx(torch.export.export(model, args), args, tmp_path / "merge.onnx", opset=opset, verify=False)
    ops = onnx_ops(path)
    assert ops.count("Loop") == len(names)
    assert ops.count("Attention") == (len(names) if opset >= 23 else 0)
    outs = run_onnx(path, *args)
    refs = model(*args)
    for name, got, want in zip(names, outs, refs):
        assert got.shape == tuple(want.shape), name
        err = np.abs(got - want.numpy()).max()
        assert err <= ATOL, (name, err)


def test_edge_cases(tmp_path):
    """Rounds that stop early, ties, and requests for nothing, as sites of one exported program.

    * alternating padding: every even key is padding and every odd one real, so no A token has a B partner
      of its kind and nothing merges (the Loop runs one round that finds no eligible token);
    * identical keys: equal similarities merge the earlier A tokens (TopK vs the stable sort) into the first
      best B (ArgMax vs torch.max); in qkv mode another choice would move the output by ~0.4;
    * ratio 0 and r = 0: no Loop iteration, size-1 tokens, i.e. dense attention (the op's own path).
    """
    q, k, v = qkv(2, 2, 2, 10, seed=1)
    alternating = (torch.arange(10) % 2 == 1).expand(2, 1, 1, 10).contiguous()
    tq, tk, tv = qkv(2, 2, 2, 64, seed=2)
    tk[:, :, 2:42] = tk[:, :, 2:3]  # 20 tied A tokens for 8 merges
    dense_args, _ = _inputs(2, 2, 9, ("bool", [0, 3], True), seed=3)
    cases = [
        ("alternating padding", MergeSite("qkv", 0.6, protect=()), (q, k, v, alternating), 0),
        ("ties", MergeSite("qkv", r=8, protect=(0,)), (tq, tk, tv), 8),
        ("ratio 0", MergeSite("qkv", 0.0), dense_args, 0),
        ("r 0", MergeSite("kv", 0.0, 0), dense_args, 0),
    ]
    for name, site, args, merged in cases:
        assert _merged(site, args[1], args[3] if len(args) > 3 else None) == merged, name
    model = Sites([c[1] for c in cases], [len(c[2]) for c in cases])
    args = tuple(t for c in cases for t in c[2])
    path = to_onnx(torch.export.export(model, args), args, tmp_path / "edge.onnx", verify=False)
    for (name, *_), got, want in zip(cases, run_onnx(path, *args), model(*args)):
        err = np.abs(got - want.numpy()).max()
        assert err <= ATOL, (name, err)


class BothModes(torch.nn.Module):
    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.kv, self.qkv = MergeSite("kv", ratio), MergeSite("qkv", ratio)

    def forward(self, q, k, v, mask):
        return self.kv(q, k, v, mask), self.qkv(q, k, v, mask)


def test_dynamic_sequence_length(tmp_path):
    """One export, run at several lengths: the request, the rounds and the plan follow the run-time length."""
    model = BothModes(0.45)
    seq = torch.export.Dim("seq", min=2, max=1024)
    q, k, v = qkv(2, 2, 2, 16)
    mask = _padding(2, 16, [0, 5], "float", full_rows=True)
    dyn = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "mask": {2: seq, 3: seq}}
    program = torch.export.export(model, (q, k, v, mask), dynamic_shapes=dyn)
    path = to_onnx(program, (q, k, v, mask), tmp_path / "dyn.onnx", dynamic_seq=True)

    merged = set()
    # 10: 5 asked and a lone padding A token at an even place in row 1: a second round runs.
    # 1: below 2 tokens nothing merges (onnxruntime runs any length; the Loop does not start).
    for length, pads in ((16, [0, 5]), (9, [2, 0]), (10, [0, 1]), (33, [7, 12]), (2, [0, 0]), (1, [0, 0])):
        q2, k2, v2 = qkv(2, 2, 2, length, seed=length)
        m2 = _padding(2, length, pads, "float", full_rows=True)
        merged.add(_merged(model.kv, k2, m2))
        for got, want in zip(run_onnx(path, q2, k2, v2, m2), model(q2, k2, v2, m2)):
            assert got.shape == tuple(want.shape)
            err = np.abs(got - want.numpy()).max()
            assert err <= ATOL, (length, err)
    assert len(merged) >= 5  # the plans really differ in size


def test_translation_is_registered_and_refusals_say_what_to_do():
    assert torch.ops.attnrw.merged_attention.default in translation_table(23)
    with pytest.raises(ConfigError, match="Dense"):
        check_exportable("kv", True)
    with pytest.raises(ConfigError, match="mode='qkv'"):
        check_exportable("tokens", False)
    check_exportable("qkv", False)


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize(
    "name,mode,ratio",
    [
        ("bert_eager", "qkv", 0.4),  # additive finfo.min mask
        ("vit_sdpa", "qkv", 0.5),  # class token protected, two rounds
    ],
)
def test_model_exports_and_verifies(tmp_path, name, mode, ratio):
    """to_onnx(verify=True) bounds every output at 1e-4 against the rewritten program."""
    model, args, kwargs = ZOO[name]()
    policy = attnrw.Merge(ratio=ratio, mode=mode)
    path = to_onnx(model, args, tmp_path / f"{name}.onnx", kwargs=kwargs, policy=policy)
    ops = onnx_ops(path)
    assert ops.count("Loop") == 2 and ops.count("Attention") == 2


def test_bert_dynamic_sequence(tmp_path):
    """BERT (SDPA: bool mask) with Merge(kv), exported with a dynamic length, verified by to_onnx and run at a
    longer length with padding in the other row."""
    model, args, kwargs = ZOO["bert_sdpa"]()
    policy = attnrw.Merge(ratio=0.35, mode="kv")
    program = attnrw.rewrite(model, args, kwargs, policy=policy, dynamic_shapes=seq_dynamic_shapes(model, args, kwargs))
    path = to_onnx(program, args, tmp_path / "bert.onnx", kwargs=kwargs, dynamic_seq=True)
    check_text_model_at(path, program, length=23, pad_row=0, pad_from=17, seed=7, atol=MODEL_ATOL)
