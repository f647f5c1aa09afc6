"""Masks and biases of a site: bring them to the canonical layout, then find out what they do.

What a mask *does* is found by evaluating it on the example inputs, not by
reading its spelling: Hugging Face builds causal masks from ``arange``
comparisons, GPT-2 slices a ``tril`` buffer, others use ``triu`` or
``is_causal``. A mask that evaluates to exactly the causal pattern and
depends on no user input (only on shapes, constants and buffers) is replaced
by ``is_causal=True``; every other mask is passed to the op as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnrw.masking import MASKED_BELOW
from attnrw.patterns import expr as E
from attnrw.patterns.context import MatchContext, Resized, Unknown, ancestors_of_all, free_symbols
from torch.fx import Node

from attnrw.patterns.graph import aten, hint, same, same_shape, shape
from attnrw.patterns.match import NoMatch

#: Masks larger than this (elements, after broadcasting to Sq×Sk) are not evaluated.
MAX_EVAL_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class MaskInfo:
    mask: Any
    causal: bool
    kind: str
    use_causal_flag: bool


def term_shape(term: Any) -> tuple:
    """Shape of a mask term (a Node, or an expression over Nodes that broadcasts them)."""
    if not isinstance(term, E.Expr):
        s = shape(term)
        if s is None:
            raise NoMatch(f"mask term {term!r} has no known shape")
        return s
    shapes = [term_shape(a) for a in term.args if isinstance(a, (E.Expr,)) or shape(a) is not None]
    shapes = [s for s in shapes if s is not None]
    if not shapes:
        return ()
    return _broadcast(shapes)


def _broadcast(shapes: list[tuple]) -> tuple:
    rank = max(len(s) for s in shapes)
    out: list[Any] = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        big = [d for d in dims if not same(d, 1)]
        out.append(big[0] if big else 1)
    return tuple(out)


def _dims(x: Any, s: tuple, offset: int = 0) -> list[Any]:
    """Sizes to use in a reshape: static ints as is, symbolic ones read off ``x`` at run time."""
    return [d if isinstance(d, int) else E.SizeOf(x, i + offset) for i, d in enumerate(s)]


def canonical_mask(terms: list[tuple[Any, tuple, float]], score_shape: tuple, xb: tuple) -> Any:
    """Sum the terms of a site into one additive mask broadcastable to (B, H, Sq, Sk).

    Each term is ``(tensor, frame, factor)``: added to the scores when they
    had shape ``frame`` (whose batch axes reshape to those of the scores),
    times ``factor`` (the scales applied after it).
    """
    if not terms:
        return None
    total = None
    total_shape: tuple = ()
    for term, frame, factor in terms:
        t = term if factor == 1.0 else E.mul(term, factor)
        ts = list(term_shape(term))
        if len(ts) > len(frame):
            raise NoMatch("a mask has more axes than the scores it is added to")
        while len(ts) < len(frame):
            t = E.unsqueeze(t, 0)
            ts.insert(0, 1)
        if not same_shape(frame[:-2], score_shape[:-2]):
            t, ts = _reframe(t, ts, frame, xb)
        else:
            while len(ts) < len(score_shape):
                t = E.unsqueeze(t, 0)
                ts.insert(0, 1)
        total = t if total is None else E.add(total, t)
        total_shape = _broadcast([total_shape, tuple(ts)]) if total_shape else tuple(ts)
    return to_bh(total, total_shape, xb)


def _reframe(t: Any, ts: list, frame: tuple, xb: tuple) -> tuple[Any, list]:
    """Move a term from a frame whose batch axes are a reshape of the scores' batch axes."""
    tail = ts[-2:]
    if all(same(d, 1) for d in ts[:-2]):
        new = [1] * len(xb) + tail
        return E.reshape(t, _dims(t, tuple(new), 0)[: len(xb)] + _dims(t, tuple(tail), len(ts) - 2)), new
    if not all(isinstance(d, int) for d in (*frame[:-2], *xb)):
        raise NoMatch("a mask is added in a reshaped frame with dynamic sizes")
    t = E.expand(t, [*frame[:-2], *_dims(t, tuple(tail), len(ts) - 2)])
    return E.reshape(t, [*xb, *_dims(t, tuple(tail), len(ts) - 2)]), [*xb, *tail]


def to_bh(m: Any, ms: tuple, xb: tuple) -> Any:
    r = len(xb)
    if r == 2:
        return m
    if r == 1:
        return E.unsqueeze(m, 1)
    if r == 0:
        return E.unsqueeze(E.unsqueeze(m, 0), 0)
    lead, heads, tail = ms[: r - 1], ms[r - 1], ms[r:]
    if all(same(d, 1) for d in lead):
        return E.reshape(m, [1, *_dims(m, (heads, *tail), r - 1)])
    if not all(isinstance(d, int) for d in xb[:-1]):
        raise NoMatch("a mask varies over folded batch axes with dynamic sizes")
    m = E.expand(m, [*xb[:-1], *_dims(m, (heads, *tail), r - 1)])
    return E.reshape(m, [-1, *_dims(m, (heads, *tail), r - 1)])


@dataclass(frozen=True)
class _Pattern:
    """What a mask evaluated at one size does."""

    causal: bool  # no key after the query's own position (bottom-right aligned) is allowed
    extra: bool  # it masks more than that (or, when not causal, masks anything)
    bias: bool  # an allowed score is shifted


def _pattern(m: Any, sq: int, sk: int) -> _Pattern | None:
    if not isinstance(m, torch.Tensor) or m.dim() < 2 or sq * sk * m[..., 0, 0].numel() > MAX_EVAL_ELEMENTS:
        return None
    if tuple(m.shape[-2:]) not in ((sq, sk), (1, sk), (sq, 1), (1, 1)):
        return None
    allowed = m if m.dtype == torch.bool else m > MASKED_BELOW
    allowed = allowed.expand(*allowed.shape[:-2], sq, sk)
    tri = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    causal = not bool((allowed & ~tri).any())
    extra = bool((~allowed & tri).any()) if causal else bool((~allowed).any())
    bias = bool(m.dtype != torch.bool and (m.masked_select(m > MASKED_BELOW) != 0).any())
    return _Pattern(causal, extra, bias)


#: Longest length a mask is evaluated at to prove what it does at every length.
MAX_PROBE_LENGTH = 2048


def _probe_sizes(mask: Any, ctx: MatchContext, rows: Any, cols: Any) -> list[dict]:
    """Size substitutions at which a mask over symbolic lengths is evaluated.

    A mask built from positions compares them against constants (a window, a
    chunk size, a buffer's length); at a length beyond every such constant
    a band or a block shows. The lengths are clamped to the range the graph
    admits for each symbol.
    """
    syms = free_symbols(rows) | free_symbols(cols)
    if not syms:
        return []
    top = max(hint(rows), hint(cols))
    nodes = ancestors_of_all(E.nodes_in(mask))
    if nodes is None:
        return []
    for n in nodes:
        for c in _ints(n.args) + _ints(list(n.kwargs.values())):
            if abs(c) < MAX_PROBE_LENGTH:
                top = max(top, abs(c))
        t = ctx.value(n) if not free_symbols(n) and n.op != "call_function" else None
        if isinstance(t, torch.Tensor):
            top = max([top, *(d for d in t.shape if d < MAX_PROBE_LENGTH)])
    lengths = sorted({min(top + hint(rows) + 1, MAX_PROBE_LENGTH), min(2 * top + 3, MAX_PROBE_LENGTH)})
    probes = []
    for length in lengths:
        subs = {}
        for s in syms:
            rng = _range_of(rows, cols, s)
            value = length
            if rng is not None:
                lo, hi = rng
                value = max(lo, min(hi, value))
            subs[s] = value
        probes.append(subs)
    return probes


def _ints(x: Any) -> list[int]:
    out: list[int] = []
    torch.fx.node.map_aggregate(x, lambda a: out.append(a) if isinstance(a, int) and not isinstance(a, bool) else None)
    return out


def _range_of(rows: Any, cols: Any, sym: Any) -> tuple[int, int] | None:
    for d in (rows, cols):
        if isinstance(d, torch.SymInt):
            rng = getattr(d.node.shape_env, "var_to_range", {}).get(sym)
            if rng is not None:
                return _finite(rng.lower, 0), _finite(rng.upper, MAX_PROBE_LENGTH)
    return None


def _finite(bound: Any, default: int) -> int:
    if getattr(bound, "is_finite", True) is False or getattr(bound, "is_infinite", False):
        return default
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):  # an infinite bound
        return default


def _evaluate_resized(mask: Any, ctx: MatchContext, subs: dict, rows: Any, cols: Any) -> _Pattern | None:
    """The mask's pattern at the sizes ``subs``, or None when it cannot be computed there."""
    r = Resized(ctx, subs)
    try:
        sq, sk = r.size(rows), r.size(cols)
        return _pattern(E.evaluate(mask, r.value), sq, sk)
    except Unknown:
        return None
    except Exception:  # user code that does not run at these sizes
        return None


def _is_value(x: Any, ctx: MatchContext, test: Any) -> bool:
    """Whether ``x`` (a number, a node or an expression without inputs) is a scalar for which ``test`` holds."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return bool(test(float(x)))
    try:
        v = E.evaluate(x, lambda n: _known(ctx, n))
    except Unknown:
        return False
    return isinstance(v, torch.Tensor) and v.numel() == 1 and bool(test(float(v)))


def _known(ctx: MatchContext, n: Any) -> Any:
    v = ctx.value(n)
    if v is None:
        raise Unknown(n.name)
    return v


_AND = {aten.bitwise_and.Tensor, aten.logical_and.default}
_SAME_PATTERN = {aten.expand.default, aten.unsqueeze.default, aten.clone.default, aten.alias.default,
                 aten._to_copy.default, aten.contiguous.default}


def conjuncts(mask: Any, ctx: MatchContext) -> list[Any]:
    """Parts of a mask that every allowed score must also pass.

    ``where(c, 0, fill)`` with a masking fill allows only where ``c`` does;
    ``c1 & c2`` only where both do; a broadcast or an unsqueeze keeps the
    trailing (query, key) pattern. A causal conjunct makes the whole mask
    causal, whatever the others (a padding mask, say) hold.
    """
    out = [mask]
    op, args = (mask.op, mask.args) if isinstance(mask, E.Expr) else (
        (mask.target, mask.args) if isinstance(mask, Node) and mask.op == "call_function" else (None, ()))
    if op is aten.where.self:
        cond, a, b = args[:3]
        if _is_value(a, ctx, lambda x: x == 0) and _is_value(b, ctx, lambda x: x <= MASKED_BELOW):
            out += conjuncts(cond, ctx)
        elif _is_value(b, ctx, lambda x: x == 0) and _is_value(a, ctx, lambda x: x <= MASKED_BELOW):
            # masked where ``cond`` holds: allowed where its negation does
            inner = _negated(cond)
            if inner is not None:
                out += conjuncts(inner, ctx)
    elif op in _AND:
        for a in args[:2]:
            out += conjuncts(a, ctx)
    elif op in _SAME_PATTERN and _same_tail(args[0], mask):
        out += conjuncts(args[0], ctx)
    return out


_NOT = {aten.bitwise_not.default, aten.logical_not.default}


def _negated(x: Any) -> Any:
    """``y`` when ``x`` is ``~y`` (a node or an expression), else None."""
    if isinstance(x, Node) and x.op == "call_function" and x.target in _NOT:
        return x.args[0]
    if isinstance(x, E.Expr) and x.op in _NOT:
        return x.args[0]
    return None


def _same_tail(a: Any, b: Any) -> bool:
    sa, sb = _shape_of(a), _shape_of(b)
    return sa is not None and sb is not None and len(sa) >= 2 and len(sb) >= 2 and same_shape(sa[-2:], sb[-2:])


def _shape_of(x: Any) -> tuple | None:
    if isinstance(x, Node):
        return shape(x)
    try:
        return term_shape(x)
    except NoMatch:
        return None


def classify_mask(
    mask: Any,
    ctx: MatchContext,
    rows: Any,
    cols: Any,
    is_causal: bool,
    batch_rank: int,
) -> MaskInfo:
    """Evaluate the canonical mask and say what it does.

    With static shapes the graph only ever runs at the example sizes, so the
    mask evaluated on the example inputs is what it does. With symbolic
    lengths that evaluation proves nothing about other lengths (a sliding
    window equals the causal pattern while the length is within it): the
    mask is also evaluated at longer lengths (:func:`_probe_sizes`), and is
    replaced by ``is_causal`` only when it is exactly causal at each. A mask
    that reads user data cannot be evaluated at another length; it is causal
    when one of its conjuncts that does not read user data is causal at
    every probe, and it is always kept.
    """
    if mask is None:
        return MaskInfo(None, is_causal, "causal" if is_causal else "none", is_causal)
    sq, sk = hint(rows), hint(cols)
    try:
        m = E.evaluate(mask, lambda n: _known(ctx, n))
    except Exception:  # unknown inputs, or user code that fails on them: the mask is opaque
        m = None
    here = _pattern(m, sq, sk)
    if here is None:
        kind = "bool" if (isinstance(m, torch.Tensor) and m.dtype == torch.bool) else "additive"
        return MaskInfo(mask, is_causal, ("causal+" + kind) if is_causal else kind, False)

    user = ctx.depends_on_user_data(E.nodes_in(mask))
    causal, extra, bias = here.causal, here.extra, here.bias
    probes = _probe_sizes(mask, ctx, rows, cols)
    proven = True  # what the example shows holds at every length the graph admits
    if probes:
        whole = [_evaluate_resized(mask, ctx, p, rows, cols) for p in probes]
        if all(w is not None for w in whole):
            causal = causal and all(w.causal for w in whole)  # type: ignore[union-attr]
            extra = extra or any(w.extra for w in whole)  # type: ignore[union-attr]
            bias = bias or any(w.bias for w in whole)  # type: ignore[union-attr]
        else:
            proven = False
            if causal and not is_causal:
                causal = any(
                    all((pc := _evaluate_resized(c, ctx, p, rows, cols)) is not None and pc.causal for p in probes)
                    for c in conjuncts(mask, ctx)[1:]
                )
    causal = causal or is_causal
    if sq == 1 and not is_causal:
        causal = False  # one query sees everything before it: nothing to tell
    parts = ["causal"] if causal else []
    if user:
        parts.append("padding")
    elif extra or not proven:
        parts.append("mask")
    if bias:
        parts.append("bias")
    kind = "+".join(parts) or "none"
    if causal and proven and not user and not bias and not extra and same(rows, cols):
        # Only for square scores: is_causal aligns top-left, a mask built for
        # a cache aligns bottom-right; they agree when q_len == kv_len.
        return MaskInfo(None, True, "causal", True)
    return MaskInfo(mask, causal, kind, is_causal)
