"""ONNX translation of ``torch.ops.attnrw.merged_attention`` (token merging, modes ``"kv"`` and ``"qkv"``).

The semantics are the op's, to the token: which tokens merge is
:func:`attnrw.kernels.merge.plan.merge_plan` and what is done with them
:func:`attnrw.kernels.merge.reference.merged_attention_torch`. Everything is
computed in the graph from the run-time sequence length, so one file serves
every length (the export's dynamic sequence axis):

1. **The request**: ``r`` (clamped to ``[0, N]``), or ``floor(ratio · N + 0.5)``
   computed in float64 exactly as Python does it.
2. **The plan** (bipartite soft matching on the keys, :func:`_match`, also
   the plan of ``attnrw::tokens_attention`` in :mod:`attnrw.export.tokens`,
   which adds token weights, the padding-first ranking and the single-pair
   fallback round of ``merge_plan(exact=True)``): the metric is
   ``k`` (as float32) averaged over the kv heads; each round normalises it,
   splits the current tokens into A (even places) and B (odd places), scores
   A × B by cosine (``MatMul``), hides protected tokens and pairs of another
   kind (padding vs real keys) with ``-inf``, takes each A's best B
   (``ReduceMax`` / ``ArgMax``, first index on ties like ``torch.max``),
   counts the eligible A tokens per batch element and takes the minimum over
   the batch (``ReduceMin`` over the batch axis), and merges the top ``step``
   A tokens (``TopK`` with an in-graph ``K``: sorted, the lower index first
   on ties, which is the reference's stable descending sort). Slots follow
   from a ``CumSum`` of the kept tokens; sizes, the size-weighted mean metric
   and the protected / padding flags of the merged tokens are
   ``ScatterElements(reduction="add")`` sums.
3. **Rounds** are an ONNX ``Loop`` whose condition is the reference's
   ``while merged < requested and tokens >= 2``, stopping when a round finds
   no eligible A token. The loop-carried tensors shrink by ``step`` tokens per
   round (ONNX and onnxruntime allow loop-carried values to change shape).
   So any ratio in ``[0, 1)``, any ``r``, any protection and any padding
   layout gives exactly the reference's rounds: there is no round limit.
4. **Merge**: k, v (and q in ``"qkv"``) are means over the members
   (``ScatterND(reduction="add")`` on token rows, in float32 for half
   inputs). The bias of a merged key is ``log(size)`` without a mask, else the
   log-sum-exp of its members' additive mask entries (max-shifted through
   ``ScatterElements(reduction="max")``, a key forbidden for all its members
   stays ``-inf``); in ``"qkv"`` mode a merged query's bias row is the mean of
   its members' rows.
5. **Attention** on the merged tokens: one standard ``Attention`` node with
   the bias as ``attn_mask`` at opset >= 23, MatMul / Add / Softmax / MatMul
   below; a query whose bias row is all ``-inf`` outputs 0. ``"qkv"``
   restores every position from its merged token (``GatherND``).

When nothing merges (``r == 0``, ``ratio`` rounding to 0, fewer than 2 tokens,
nothing eligible) the op runs plain dense attention and this graph runs the
same attention over size-1 "merged" tokens: equal up to rounding.

Limits (``ConfigError`` from :func:`check_exportable`, raised before export):
``is_causal=True`` (the op itself rejects it) and a ``mode`` other than
``"kv"`` / ``"qkv"`` (``Merge(mode="tokens")`` becomes the tokens ops of
:mod:`attnrw.export.tokens`, or ``"qkv"`` at sites whose tokens cannot be
carried on). The head counts must be static (they are in every export). The
``Loop`` body is traced by a second instance of the exporter's own recorder
(``torch.onnx.export(dynamo=True)``, the only caller); outside it the
translation raises ``RuntimeError``.
Outputs are verified in fp32; the plan is a discrete choice, so keys whose
similarities tie to within float32 rounding (~1e-7) may pick another partner
in onnxruntime than in PyTorch, as between any two devices.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxscript.evaluator
import torch
from onnxscript import opset18 as op
from onnxscript import opset23 as op23

from attnrw.errors import ConfigError
from attnrw.masking import MASKED_BELOW
from attnrw.export._graph import (
    Value, const, dim, ints, lowest_off_sentinel, masked_softmax, neg_inf_like, rank, scalar, static_dim, to_rank4, zero_like,
)
from attnrw.export.dense import ATTENTION_OPSET
from attnrw.export.registry import register_translation
from attnrw.kernels import merge as _merge_ops  # noqa: F401  (registers torch.ops.attnrw.merged_attention)

#: The modes with an ONNX form (all the op has).
EXPORTABLE_MODES = ("kv", "qkv")

_INT64_MAX = np.iinfo(np.int64).max
_LOOP_IDS = itertools.count()  # Loop bodies are named apart: one model may hold many
_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def check_exportable(mode: str, is_causal: bool) -> None:
    """Raise ``ConfigError`` for merged-attention settings the ONNX translation does not support."""
    if is_causal:
        raise ConfigError(
            "merged_attention with is_causal=True has no ONNX form (nor a PyTorch one: merging keys "
            "across positions breaks causality). Keep causal sites Dense (the rewriter does so for Merge)."
        )
    if mode not in EXPORTABLE_MODES:
        raise ConfigError(
            f"merged_attention mode {mode!r} has no ONNX translation; export a model rewritten with "
            f"Merge(mode='kv'), Merge(mode='qkv') or Merge(mode='tokens')"
        )


def merged_translation(opset: int) -> Callable[..., Value]:
    """The translation function of ``attnrw::merged_attention`` for a target ``opset`` (>= 18)."""

    def merged_attention(
        q: Value,
        k: Value,
        v: Value,
        attn_mask: Value | None = None,
        is_causal: bool = False,
        scale: float = 1.0,
        ratio: float = 0.0,
        r: int = -1,
        mode: str = "kv",
        protect: Sequence[int] = (),
        impl: str = "auto",
    ) -> Value:
        return merged_attention_graph(q, k, v, attn_mask, is_causal, scale, ratio, r, mode, protect, opset=opset)

    return merged_attention


def merged_attention_graph(
    q: Value,
    k: Value,
    v: Value,
    attn_mask: Value | None,
    is_causal: bool,
    scale: float,
    ratio: float,
    r: int,
    mode: str,
    protect: Sequence[int],
    opset: int = ATTENTION_OPSET,
) -> Value:
    """Trace the plan, the merge and the attention (module docstring); returns (B, H, q_len, Dv)."""
    check_exportable(mode, bool(is_causal))
    heads = _head_counts(q, k)
    qkv = mode == "qkv"
    batch, n = dim(k, 0), dim(k, 2)
    q_len = dim(q, 2)
    mask_rows = _mask_query_rows(attn_mask)
    mask4 = None if attn_mask is None else to_rank4(attn_mask)
    mask_is_bool = attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL

    plan = _merge_plan(k, mask4, mask_is_bool, batch, n, float(ratio), int(r), [int(p) for p in protect])

    km = _merge_tokens(k, plan)
    vm = _merge_tokens(v, plan)
    qm = _merge_tokens(q, plan) if qkv else q
    acc = _acc_dtype(q.dtype)
    if mask4 is None:
        bias = op.Unsqueeze(op.Log(op.Cast(plan.sizes, to=acc)), ints(1, 2))  # (B, 1, 1, M)
    else:
        bias = _key_logsumexp(_additive(mask4, mask_is_bool, acc), plan)  # (B, h', q', M)
        if qkv and mask_rows != 1:
            bias = _merge_bias_rows(bias, plan)  # (B, h', M, M)

    out = _attend(qm, km, vm, bias, plan.m if qkv else q_len, float(scale), mask4 is not None, opset, heads, q.dtype)
    return _restore(out, plan) if qkv else out


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Plan:
    """In-graph merge plan: ``index`` (B, N) slot of each token, ``sizes`` (B, M), ``m`` = [M], ``batch`` = [B]."""

    index: Value
    sizes: Value
    m: Value
    batch: Value


def _acc_dtype(dtype: ir.DataType | None) -> ir.DataType:
    """The dtype sums and the bias are computed in: float32 for half inputs, else the input's."""
    if dtype is None:
        raise ValueError("merged attention inputs must have a known dtype to export")
    return ir.DataType.FLOAT if dtype in _HALF else dtype


def _mask_query_rows(mask: Value | None) -> int | None:
    """The static size of the mask's query axis (1 when it has none), ``None`` when dynamic."""
    if mask is None:
        return None
    return static_dim(mask, -2) if rank(mask) >= 2 else 1


def _request(n: Value, ratio: float, r: int) -> Value:
    """[want]: ``r``, or ``floor(ratio · N + 0.5)`` in float64 (bit-exact with Python), clamped to [0, N]."""
    if r >= 0:
        want = ints(r)
    else:
        scaled = op.Mul(op.Cast(n, to=ir.DataType.DOUBLE), const(np.array([ratio], dtype=np.float64)))
        want = op.Cast(op.Floor(op.Add(scaled, const(np.array([0.5], dtype=np.float64)))), to=ir.DataType.INT64)
    return op.Max(op.Min(want, n), ints(0))


def _key_padding(mask4: Value, is_bool: bool, batch: Value, n: Value) -> Value:
    """(B, N) bool: keys the mask forbids for every query of every head (``plan.key_padding``)."""
    if is_bool:
        forbidden = op.Not(mask4)
    else:
        forbidden = op.LessOrEqual(mask4, op.CastLike(const(np.array(MASKED_BELOW, dtype=np.float32)), mask4))
    # All over heads and queries: the min of 0/1 over those axes.
    every = op.ReduceMin(op.Cast(forbidden, to=ir.DataType.INT32), ints(1, 2), keepdims=0)  # (mb, mk)
    return op.Expand(op.Cast(every, to=ir.DataType.BOOL), op.Concat(batch, n, axis=0))


def _protected(protect: list[int], batch: Value, n: Value) -> Value:
    """(B, N) bool: the positions in ``protect`` (positions >= N protect nothing)."""
    pos = _arange(n)
    hit = op.Equal(op.Unsqueeze(pos, ints(1)), const(np.array([sorted(set(protect))], dtype=np.int64)))
    any_hit = op.Cast(op.ReduceMax(op.Cast(hit, to=ir.DataType.INT32), ints(1), keepdims=0), to=ir.DataType.BOOL)
    return op.Expand(op.Unsqueeze(any_hit, ints(0)), op.Concat(batch, n, axis=0))


def _arange(n: Value) -> Value:
    """0, 1, …, n - 1 (int64) for ``n`` = [n]."""
    return op.Range(const(np.array(0, dtype=np.int64)), scalar(n), const(np.array(1, dtype=np.int64)))


def _key_metric(k: Value) -> Value:
    """(B, T, D) float32: what the matching compares, the keys averaged over the kv heads."""
    return op.ReduceMean(op.Cast(k, to=ir.DataType.FLOAT), ints(1), keepdims=0)


def _merge_plan(
    k: Value, mask4: Value | None, mask_is_bool: bool, batch: Value, n: Value, ratio: float, r: int, protect: list[int]
) -> _Plan:
    """The plan of ``merged_attention``: :func:`_match` over the N keys, each of weight 1."""
    prot = _protected(protect, batch, n) if protect else None
    kind = None if mask4 is None else _key_padding(mask4, mask_is_bool, batch, n)
    ones = op.Expand(ints(1), op.Concat(batch, n, axis=0))
    index, sizes = _match(_key_metric(k), ones, _request(n, ratio, r), batch, prot, kind)
    return _Plan(index=index, sizes=sizes, m=op.Shape(sizes, start=1, end=2), batch=batch)


def _match(
    metric: Value,
    sizes: Value,
    want: Value,
    batch: Value,
    prot: Value | None = None,
    kind: Value | None = None,
    exact: bool = False,
    padding_first: bool = False,
) -> tuple[Value, Value]:
    """Bipartite soft matching in rounds (``plan.merge_plan``), in a ``Loop`` (module docstring, steps 2-3).

    ``metric`` (B, T, D) float32, ``sizes`` (B, T) int64 the weight of each
    token (the members it stands for), ``want`` [1] the merges asked for (in
    ``[0, T]``), ``prot`` / ``kind`` (B, T) bool or ``None``: tokens that
    never merge, padding tokens. ``exact`` and ``padding_first`` are
    ``merge_plan``'s: padding A tokens rank above every real one (+4 on their
    cosines), and a round whose split leaves no eligible A token merges the
    single most similar eligible pair instead (:func:`_best_pair`). Returns
    ``index`` (B, T), the slot of each token, and the merged ``sizes`` (B, M).
    """
    t0 = op.Shape(sizes, start=1, end=2)
    index = op.Expand(op.Unsqueeze(_arange(t0), ints(0)), op.Concat(batch, t0, axis=0))
    flags = [f for f in (prot, kind) if f is not None]
    has_prot, has_kind = prot is not None, kind is not None

    def one_round(metric: Value, sizes: Value, index: Value, merged: Value, *flags: Value) -> tuple[Value, list[Value]]:
        prot = flags[0] if has_prot else None
        kind = flags[-1] if has_kind else None
        t = op.Shape(sizes, start=1, end=2)
        norm = op.Max(op.ReduceL2(metric, ints(-1), keepdims=1), const(np.array(1e-12, dtype=np.float32)))
        x = op.Div(metric, norm)
        scores = op.MatMul(_evens(x), op.Transpose(_odds(x), perm=[0, 2, 1]))  # (B, |A|, |B|) cosine
        scores = _hide(scores, _pairs_apart(prot, kind, _evens, _odds))
        if padding_first and kind is not None:
            bonus = op.Mul(op.Cast(_evens(kind), to=ir.DataType.FLOAT), const(np.array(4.0, dtype=np.float32)))
            scores = op.Add(scores, op.Unsqueeze(bonus, ints(2)))  # cosines lie in [-1, 1]
        best = op.ReduceMax(scores, ints(-1), keepdims=0)  # (B, |A|)
        dst = op.ArgMax(scores, axis=-1, keepdims=0)  # first index on ties, like torch.max
        eligible = op.ReduceSum(op.Cast(op.Greater(best, neg_inf_like(best)), to=ir.DataType.INT64), ints(-1), keepdims=0)
        fewest = op.ReduceMin(eligible, ints(0), keepdims=1)  # [1]: the same step for the whole batch
        step = op.Min(op.Sub(want, merged), fewest)
        _, src_a = op.TopK(best, step, axis=-1, largest=1, sorted=1)  # (B, step): ties to the lower index
        src = op.Mul(src_a, ints(2))  # places in the current token list
        target = op.Add(op.Mul(op.GatherElements(dst, src_a, axis=1), ints(2)), ints(1))
        if exact:  # (B, 0) unless the split stalled: then one pair, wherever it is
            pair_src, pair_target = _best_pair(x, t, _pairs_apart(prot, kind, _all, _all), op.Equal(fewest, ints(0)))
            src, target = op.Concat(src, pair_src, axis=1), op.Concat(target, pair_target, axis=1)
            step = op.Shape(src, start=1, end=2)
        grid_t = op.Concat(batch, t, axis=0)
        kept = op.ScatterElements(op.Expand(ints(1), grid_t), src, op.Mul(src, ints(0)), axis=1)
        slot = op.Sub(op.CumSum(kept, const(np.array(1, dtype=np.int64))), ints(1))
        target = op.ScatterElements(op.Expand(op.Unsqueeze(_arange(t), ints(0)), grid_t), src, target, axis=1)
        slot_map = op.GatherElements(slot, target, axis=1)  # (B, t): new slot of each current token
        new_index = op.GatherElements(slot_map, index, axis=1)
        new_t = op.Sub(t, step)
        grid_new = op.Concat(batch, new_t, axis=0)
        new_sizes = op.ScatterElements(op.Expand(ints(0), grid_new), slot_map, sizes, axis=1, reduction="add")
        # Size-weighted mean of the members' metrics (the next round's; unused after the last one).
        weighted = op.Mul(metric, op.Unsqueeze(op.Cast(sizes, to=ir.DataType.FLOAT), ints(2)))
        rows = op.Expand(op.Unsqueeze(slot_map, ints(2)), op.Shape(metric))
        zeros = op.Expand(const(np.array(0.0, dtype=np.float32)), op.Concat(grid_new, op.Shape(metric, start=2), axis=0))
        sums = op.ScatterElements(zeros, rows, weighted, axis=1, reduction="add")
        new_metric = op.Div(sums, op.Unsqueeze(op.Cast(new_sizes, to=ir.DataType.FLOAT), ints(2)))
        # Flags of a merged token: its kept member's (sources are unprotected and of the target's kind).
        new_flags = [
            op.Cast(op.ScatterElements(op.Expand(ints(0), grid_new), slot_map, op.Cast(f, to=ir.DataType.INT64),
                                       axis=1, reduction="max"), to=ir.DataType.BOOL)
            for f in flags
        ]
        new_merged = op.Add(merged, step)
        go = op.And(op.And(op.Greater(step, ints(0)), op.Less(new_merged, want)), op.GreaterOrEqual(new_t, ints(2)))
        return scalar(go), [new_metric, new_sizes, new_index, new_merged, *new_flags]

    start = scalar(op.And(op.Greater(want, ints(0)), op.GreaterOrEqual(t0, ints(2))))
    carried = [metric, sizes, index, ints(0), *flags]
    types = [ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.INT64, ir.DataType.INT64] + [ir.DataType.BOOL] * len(flags)
    ranks = [3, 2, 2, 1] + [2] * len(flags)
    _, sizes, index, *_ = _loop(start, carried, types, ranks, one_round, "attnrw_merge_round")
    return index, sizes


def _pairs_apart(
    prot: Value | None, kind: Value | None, rows: Callable[[Value], Value], cols: Callable[[Value], Value]
) -> Value | None:
    """(B, |rows|, |cols|) bool: pairs that may not merge (a protected token, or padding with real), or ``None``."""
    forbid = None
    if prot is not None:
        forbid = op.Or(op.Unsqueeze(rows(prot), ints(2)), op.Unsqueeze(cols(prot), ints(1)))
    if kind is not None:
        other = op.Xor(op.Unsqueeze(rows(kind), ints(2)), op.Unsqueeze(cols(kind), ints(1)))
        forbid = other if forbid is None else op.Or(forbid, other)
    return forbid


def _hide(scores: Value, forbid: Value | None) -> Value:
    return scores if forbid is None else op.Where(forbid, neg_inf_like(scores), scores)


def _best_pair(x: Value, t: Value, forbid: Value | None, stalled: Value) -> tuple[Value, Value]:
    """``plan._best_pair``: (B, 1) source and target places of each element's most similar eligible pair.

    Over all ordered pairs of distinct current tokens (``x`` normalised,
    (B, t, D)); the first maximum of the flattened (B, t·t) scores, like
    ``torch.argmax``. Both are (B, 0) unless ``stalled`` ([1] bool) and every
    batch element has an eligible pair (the op guarantees one; without it
    the round merges nothing and the rounds stop).
    """
    here = _arange(t)
    same = op.Equal(op.Unsqueeze(here, ints(1)), op.Unsqueeze(here, ints(0)))  # (t, t): a token with itself
    scores = _hide(op.MatMul(x, op.Transpose(x, perm=[0, 2, 1])), same if forbid is None else op.Or(forbid, same))
    flat = op.Reshape(scores, op.Concat(op.Shape(scores, start=0, end=1), ints(-1), axis=0))
    pick = op.ArgMax(flat, axis=1, keepdims=1)  # (B, 1)
    found = op.Greater(op.ReduceMax(flat, ints(1), keepdims=1), neg_inf_like(flat))
    every = op.Cast(op.ReduceMin(op.Cast(found, to=ir.DataType.INT64), ints(0), keepdims=0), to=ir.DataType.BOOL)
    take = op.Cast(op.And(stalled, every), to=ir.DataType.INT64)  # [1]: 1 or 0 columns
    return (op.Slice(op.Div(pick, t), ints(0), take, ints(1)), op.Slice(op.Mod(pick, t), ints(0), take, ints(1)))


def _all(x: Value) -> Value:
    return x


def _evens(x: Value) -> Value:
    """Tokens at even places (set A) along axis 1."""
    return op.Slice(x, ints(0), ints(_INT64_MAX), ints(1), ints(2))


def _odds(x: Value) -> Value:
    """Tokens at odd places (set B) along axis 1."""
    return op.Slice(x, ints(1), ints(_INT64_MAX), ints(1), ints(2))


def _loop(
    cond: Value,
    carried: list[Value],
    types: list[ir.DataType],
    ranks: list[int],
    body: Callable[..., tuple[Value, list[Value]]],
    name: str,
) -> list[Value]:
    """An ONNX ``Loop`` (no trip count, condition ``cond``) over ``carried``; ``body`` traces one iteration.

    ``body(*carried)`` returns (scalar bool: run again, new carried values).
    The body is traced into a subgraph by a second recorder of the exporter's
    kind, and the ``Loop`` node is appended to the exporter's recorder
    directly: ``op.Loop`` would be recorded with one output, as its outputs
    are variadic. The subgraph reads outer values (e.g. the request) by
    reference, as ONNX allows.
    """
    outer = onnxscript.evaluator.default()
    nodes = getattr(outer, "nodes", None)
    if not isinstance(nodes, list) or not hasattr(outer, "opset"):
        raise RuntimeError(
            "the merged_attention / tokens_attention translations build an ONNX Loop and must be traced by "
            "torch.onnx.export(dynamo=True) (attnrw.export.to_onnx)"
        )
    prefix = f"{name}{next(_LOOP_IDS)}"
    iter_in = ir.Value(name=f"{prefix}_iter", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond_in = ir.Value(name=f"{prefix}_cond_in", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    inputs = [
        ir.Value(name=f"{prefix}_in{i}", type=ir.TensorType(t), shape=ir.Shape([None] * rk))
        for i, (t, rk) in enumerate(zip(types, ranks))
    ]
    recorder = type(outer)(outer.opset, {})  # its own constants: the outer graph's must not point inside
    with onnxscript.evaluator.default_as(recorder):
        go, outputs = body(*inputs)
    if len(outputs) != len(carried):
        raise AssertionError("a Loop body must return one value per carried value")
    go.dtype = ir.DataType.BOOL
    go.shape = ir.Shape([])
    for i, (value, t, rk) in enumerate(zip(outputs, types, ranks)):
        value.dtype = t
        value.shape = ir.Shape([None] * rk)
    # Names unique in the model: the exporter's naming pass numbers each graph on its own.
    count = 0
    for node in recorder.nodes:
        node.name = f"{prefix}_node{count}"
        for value in node.outputs:
            value.name = f"{prefix}_v{count}"
            count += 1
    graph = ir.Graph([iter_in, cond_in, *inputs], [go, *outputs], nodes=recorder.nodes, name=prefix)
    loop = ir.Node("", "Loop", inputs=[None, cond, *carried], attributes=[ir.AttrGraph("body", graph)],
                   num_outputs=len(carried))
    nodes.append(loop)
    for value, t, rk in zip(loop.outputs, types, ranks):
        value.dtype = t
        value.shape = ir.Shape([None] * rk)
    return list(loop.outputs)


# ----------------------------------------------------------------------------- merge, bias, attention, restore


def _merge_tokens(x: Value, plan: _Plan, weights: Value | None = None) -> Value:
    """(B, h, N, d) -> (B, h, M, d): the mean of each merged token's members (:func:`_segment_mean`)."""
    rows = op.Transpose(x, perm=[0, 2, 1, 3])  # (B, N, h, d)
    return op.Transpose(_segment_mean(rows, plan, x.dtype, 2, weights), perm=[0, 2, 1, 3])


def _segment_mean(rows: Value, plan: _Plan, dtype: ir.DataType | None, tail: int, weights: Value | None = None) -> Value:
    """(B, N, ...) -> (B, M, ...): the mean of each merged token's members along axis 1.

    ``dtype`` is that of ``rows``, ``tail`` its number of axes after the
    token axis. With ``weights`` (B, N) the mean is weighted (``plan.sizes``
    are then the sums of the weights). Sums are ``ScatterND(reduction="add")``
    in float32 for half inputs.
    """
    acc = _acc_dtype(dtype)
    if acc != dtype:
        rows = op.Cast(rows, to=acc)
    after = ints(*range(2, 2 + tail))
    if weights is not None:
        rows = op.Mul(rows, op.Unsqueeze(op.Cast(weights, to=acc), after))
    zeros = op.Expand(op.CastLike(const(np.array(0.0, dtype=np.float32)), rows),
                      op.Concat(plan.batch, plan.m, op.Shape(rows, start=2), axis=0))
    sums = op.ScatterND(zeros, _batch_slot_index(plan), rows, reduction="add")  # (B, M, ...)
    mean = op.Div(sums, op.Unsqueeze(op.CastLike(plan.sizes, sums), after))
    return mean if acc == dtype else op.Cast(mean, to=dtype)


def _batch_slot_index(plan: _Plan) -> Value:
    """(B, N, 2) int64: [batch element, slot] of every token, for ``ScatterND``."""
    b = op.Expand(op.Unsqueeze(_arange(plan.batch), ints(1)), op.Shape(plan.index))
    return op.Concat(op.Unsqueeze(b, ints(2)), op.Unsqueeze(plan.index, ints(2)), axis=2)


def _additive(mask4: Value, is_bool: bool, acc: ir.DataType) -> Value:
    """The mask as an additive tensor in ``acc`` (bool: 0 / -inf)."""
    if is_bool:
        zero = op.Cast(const(np.array(0.0, dtype=np.float32)), to=acc)
        return op.Where(mask4, zero, op.Cast(const(np.array(-np.inf, dtype=np.float32)), to=acc))
    return op.Cast(mask4, to=acc)


def _key_logsumexp(madd: Value, plan: _Plan) -> Value:
    """log Σ exp of each merged key's members: (mb, h', q', N') -> (B, h', q', M), max-shifted like the reference."""
    madd = op.Expand(madd, op.Concat(plan.batch, ints(1, 1), op.Shape(plan.index, start=1, end=2), axis=0))
    idx = op.Expand(op.Unsqueeze(plan.index, ints(1, 2)), op.Shape(madd))
    shape = op.Concat(op.Shape(madd, start=0, end=3), plan.m, axis=0)
    neg_inf = neg_inf_like(madd)
    top = op.ScatterElements(op.Expand(neg_inf, shape), idx, madd, axis=3, reduction="max")
    # A merged key whose members are all -inf stays -inf: shift it by 0, not by -inf (no NaN).
    top = op.Where(op.Equal(top, neg_inf), zero_like(madd), top)
    shifted = op.Exp(op.Sub(madd, op.GatherElements(top, idx, axis=3)))
    sums = op.ScatterElements(op.Expand(zero_like(madd), shape), idx, shifted, axis=3, reduction="add")
    return op.Add(top, op.Log(sums))


def _merge_bias_rows(bias: Value, plan: _Plan) -> Value:
    """Mean over the members of each merged query: (B, h', N, M) -> (B, h', M, M)."""
    idx = op.Expand(op.Unsqueeze(plan.index, ints(1, 3)), op.Shape(bias))
    shape = op.Concat(op.Shape(bias, start=0, end=2), plan.m, op.Shape(bias, start=3, end=4), axis=0)
    sums = op.ScatterElements(op.Expand(zero_like(bias), shape), idx, bias, axis=2, reduction="add")
    return op.Div(sums, op.Unsqueeze(op.CastLike(plan.sizes, sums), ints(1, 3)))


def _head_counts(q: Value, k: Value) -> tuple[int, int]:
    """The static numbers of query and key/value heads of the op's inputs (``ValueError`` when dynamic)."""
    heads, kv_heads = static_dim(q, 1), static_dim(k, 1)
    if heads is None or kv_heads is None:
        raise ValueError("the numbers of query and key/value heads must be static to export merged attention")
    return heads, kv_heads


def _attend(
    q: Value, k: Value, v: Value, bias: Value, rows: Value, scale: float, masked: bool, opset: int,
    heads: tuple[int, int], dtype: ir.DataType | None,
) -> Value:
    """Attention of q (B, H, rows, D) on the merged k, v with the additive ``bias``; a query whose bias row is all
    ``-inf`` (only possible when ``masked``) outputs 0. ``heads``: :func:`_head_counts` of the op's inputs,
    ``dtype`` the dtype of its q (merged values built in the trace carry none)."""
    heads, kv_heads = heads
    if opset >= ATTENTION_OPSET:
        out = _attend_op23(q, k, v, bias, rows, scale, dtype)
    else:
        out = _attend_decomposed(q, k, v, bias, heads, kv_heads, scale, guard=masked)
    if masked:
        seen = op.Greater(op.ReduceMax(bias, ints(-1), keepdims=1), neg_inf_like(bias))
        out = op.Where(seen, out, zero_like(out))
    return out


def _attend_op23(q: Value, k: Value, v: Value, bias: Value, rows: Value, scale: float, dtype: ir.DataType | None) -> Value:
    """One ``Attention`` node with the bias as its additive mask (4-D inputs: GQA from the shapes).

    onnxruntime wants the mask's query axis at full length, so the bias is
    expanded over it (a (B, 1, 1, M) bias to (B, 1, rows, M)). A bias row that a
    ``finfo.min`` mask absorbed (its merged keys' log-sum-exps round back to
    ``finfo.min`` in fp32) attends evenly over the merged keys, as SDPA does in
    the op, once moved off onnxruntime's sentinel (:func:`lowest_off_sentinel`).
    """
    mask = lowest_off_sentinel(op.CastLike(bias, q), dtype)
    mask = op.Expand(mask, op.Concat(ints(1, 1), rows, ints(1), axis=0))
    y, _, _, _ = op23.Attention(q, k, v, mask, scale=scale)
    return y


def _attend_decomposed(
    q: Value, k: Value, v: Value, bias: Value, heads: int, kv_heads: int, scale: float, guard: bool
) -> Value:
    """MatMul / Add / Softmax / MatMul with the bias (opset < 23); GQA by repeating the merged k, v."""
    if heads != kv_heads:
        k, v = (_repeat_heads(x, heads // kv_heads) for x in (k, v))
    qs = op.Mul(q, op.CastLike(const(np.array(scale, dtype=np.float32)), q))
    scores = op.MatMul(qs, op.Transpose(k, perm=[0, 1, 3, 2]))
    scores = op.Add(scores, op.CastLike(bias, scores))
    # Without a mask the bias is finite and every row sees a key.
    return op.MatMul(masked_softmax(scores, guard_empty_rows=guard), v)


def _repeat_heads(x: Value, groups: int) -> Value:
    """(B, kv_heads, M, d) -> (B, kv_heads·groups, M, d), kv head h read by query heads h·groups … (``repeat_kv``)."""
    expanded = op.Expand(op.Unsqueeze(x, ints(2)), ints(1, 1, groups, 1, 1))
    shape = op.Concat(op.Shape(x, start=0, end=1), ints(-1), op.Shape(x, start=2, end=4), axis=0)
    return op.Reshape(expanded, shape)


def _restore(out: Value, plan: _Plan) -> Value:
    """(B, H, M, Dv) -> (B, H, N, Dv): each token takes its merged token's output."""
    rows = op.Transpose(out, perm=[0, 2, 1, 3])  # (B, M, H, Dv)
    return op.Transpose(_gather_rows(rows, plan.index), perm=[0, 2, 1, 3])


def _gather_rows(rows: Value, index: Value) -> Value:
    """(B, M, ...) -> (B, N, ...): row ``index[b, n]`` of batch element ``b`` for every token ``n``."""
    return op.GatherND(rows, op.Unsqueeze(index, ints(2)), batch_dims=1)


register_translation(
    torch.ops.attnrw.merged_attention.default, merged_translation, check=check_exportable, per_opset=True
)
