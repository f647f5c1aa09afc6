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

from attnrw.patterns import expr as E
from attnrw.patterns.context import MatchContext
from attnrw.patterns.graph import hint, same, same_shape, shape
from attnrw.patterns.match import NoMatch

#: Scores at or below this are treated as masked out when classifying a mask.
MASKED_BELOW = -1e4
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


class _Unknown(Exception):
    pass


def classify_mask(
    mask: Any,
    ctx: MatchContext,
    rows: Any,
    cols: Any,
    is_causal: bool,
    batch_rank: int,
) -> MaskInfo:
    """Evaluate the canonical mask on the example inputs and say what it does."""
    if mask is None:
        return MaskInfo(None, is_causal, "causal" if is_causal else "none", is_causal)

    def env(n: Any) -> Any:
        v = ctx.value(n)
        if v is None:
            raise _Unknown
        return v

    sq, sk = hint(rows), hint(cols)
    try:
        m = E.evaluate(mask, env)
    except _Unknown:
        m = None
    except Exception:  # evaluation of user code failed: treat the mask as opaque
        m = None
    if not isinstance(m, torch.Tensor) or m.dim() != 4 or sq * sk * m.shape[0] * m.shape[1] > MAX_EVAL_ELEMENTS:
        kind = "bool" if (isinstance(m, torch.Tensor) and m.dtype == torch.bool) else "additive"
        return MaskInfo(mask, is_causal, ("causal+" + kind) if is_causal else kind, False)

    allowed = m if m.dtype == torch.bool else m > MASKED_BELOW
    allowed = allowed.expand(*allowed.shape[:-2], sq, sk)
    tri = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    causal = is_causal or not bool((allowed & ~tri).any())
    if sq == 1 and not is_causal:
        causal = False  # one query sees everything before it: nothing to tell
    has_bias = bool(m.dtype != torch.bool and (m.masked_select(m > MASKED_BELOW) != 0).any())
    user = ctx.depends_on_user_input(E.nodes_in(mask))
    extra = bool((~allowed & tri).any()) if causal else bool((~allowed).any())
    parts = ["causal"] if causal else []
    if user:
        parts.append("padding")
    elif extra:
        parts.append("mask")
    if has_bias:
        parts.append("bias")
    kind = "+".join(parts) or "none"
    if causal and not user and not has_bias and not extra and sq == sk:
        # Only for square scores: is_causal aligns top-left, a mask built for
        # a cache aligns bottom-right; they agree when q_len == kv_len.
        return MaskInfo(None, True, "causal", True)
    return MaskInfo(mask, causal, kind, is_causal)
