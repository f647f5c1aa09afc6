"""``scaled_dot_product_attention`` in every aten form.

Matches ``aten.scaled_dot_product_attention`` (what ``torch.export`` keeps)
and the backend ops it dispatches to (``_scaled_dot_product_flash_attention``
and its CPU variant, ``_efficient_``, ``_cudnn_``, ``_math``,
``_fused_attention_overrideable``), with masks, ``is_causal``, ``scale``
and ``enable_gqa``. ``repeat_kv`` in front of the keys and values is undone.

Refused when dropout is active (the rewrite would not be exact) or when an
extra output (log-sum-exp, debug mask) is used, as in a training graph.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from torch.fx import Node

from attnrw.patterns import expr as E
from attnrw.patterns.context import MatchContext
from attnrw.patterns.graph import aten, dtype_name, hint, module_path, real_users, shape, tensor_val
from attnrw.patterns.masks import classify_mask, to_bh
from attnrw.patterns.match import Match, NoMatch, aligned, attended_axis, canonical_bh, from_canonical_bh, peel_repeat_kv
from attnrw.patterns.site import AttentionSite

#: Every aten form of SDPA, and whether it returns a tuple (output first).
SDPA_OPS = {
    aten.scaled_dot_product_attention.default: False,
    aten._scaled_dot_product_flash_attention_for_cpu.default: True,
    aten._scaled_dot_product_flash_attention.default: True,
    aten._scaled_dot_product_efficient_attention.default: True,
    aten._scaled_dot_product_cudnn_attention.default: True,
    aten._scaled_dot_product_attention_math.default: True,
    aten._scaled_dot_product_fused_attention_overrideable.default: True,
}


def _arguments(node: Node) -> dict[str, Any]:
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def match_sdpa(node: Node, ctx: MatchContext) -> Match:
    """Match one SDPA-family node; raises :class:`NoMatch` with the reason."""
    a = _arguments(node)
    q, k, v = a["query"], a["key"], a["value"]
    mask = a.get("attn_mask", a.get("attn_bias"))
    dropout_p = float(a.get("dropout_p") or 0.0)
    if dropout_p > 0:
        raise NoMatch(f"dropout_p={dropout_p} is active (training mode); the rewrite would not be exact")
    if a.get("dropout_mask") is not None:
        raise NoMatch("an explicit dropout mask is given")
    is_causal = bool(a.get("is_causal") or False)
    qs, ks, vs = shape(q), shape(k), shape(v)
    if qs is None or ks is None or vs is None or len(qs) < 2 or len(qs) != len(ks):
        raise NoMatch("query and key ranks differ or are unknown")
    xb = qs[:-2]
    rows, cols, head_dim = qs[-2], ks[-2], qs[-1]
    scale = a.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(hint(head_dim))

    replace = node
    if SDPA_OPS[node.target]:
        users = real_users(node)
        outs = [u for u in users if u.target is operator.getitem]
        if len(outs) != len(users):
            raise NoMatch("the tuple output is used as a whole")
        main = [u for u in outs if u.args[1] == 0]
        if any(real_users(u) for u in outs if u.args[1] != 0):
            raise NoMatch("an extra output (log-sum-exp or debug mask) is used, as in a training graph")
        if len(main) != 1:
            raise NoMatch("the attention output is unused")
        replace = main[0]

    heads = xb[-1] if xb else 1
    kv_heads = hint(ks[-3]) if len(ks) >= 3 else 1
    if len(xb) == 2 and kv_heads == hint(heads):
        k_src, kv_k = peel_repeat_kv(k, heads)
        v_src, kv_v = peel_repeat_kv(v, heads)
        if kv_k is not None and kv_k == kv_v:
            k, v, kv_heads = k_src, v_src, kv_k

    cmask = None
    if isinstance(mask, Node):
        ms = list(shape(mask) or ())
        m: Any = mask
        while len(ms) < len(qs):
            m = E.unsqueeze(m, 0)
            ms.insert(0, 1)
        cmask = to_bh(m, tuple(ms), xb)
    info = classify_mask(cmask, ctx, rows, cols, is_causal=is_causal, batch_rank=len(xb))

    qv = tensor_val(q)
    axis = attended_axis(q, k, rows, cols, ctx)
    site = AttentionSite(
        module_path=module_path(node),
        source="sdpa",
        num_heads=hint(heads),
        num_kv_heads=kv_heads,
        q_len=hint(rows),
        kv_len=hint(cols),
        head_dim=hint(head_dim),
        v_head_dim=hint(vs[-1]),
        scale=scale,
        causal=info.causal,
        mask=info.kind,
        dropout_p=dropout_p,
        dtype=dtype_name(qv.dtype),
        batch=hint(xb[0]) if len(xb) >= 2 else 1,
        self_attention=aligned(q, k, rows, cols, ctx, info.causal, axis),
        attended_axis=axis,
        node=node.name,
    )
    return Match(
        site=site,
        q=canonical_bh(q, len(xb)),
        k=canonical_bh(k, len(xb)),
        v=canonical_bh(v, len(xb)),
        mask=info.mask,
        is_causal=is_causal or info.use_causal_flag,
        scale=scale,
        replace=replace,
        output=from_canonical_bh(E.RESULT, xb, q),
        interior={node, replace},
        anchor=node,
    )
