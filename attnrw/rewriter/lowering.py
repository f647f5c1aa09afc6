"""From a policy's :class:`~attnrw.Lowering` to a call: the op's arguments by name, and a score bias traced in.

:func:`lower_site` asks the policy (``policy.lower(site)``) and checks the
answer; :func:`emit_site` puts the call into a graph, :func:`call_site`
runs it on tensors (calibration). Both bind the op's arguments by name
through its schema (:mod:`attnrw.opargs`), so a policy's op only has to
start with ``(q, k, v, attn_mask, is_causal, scale)``.

A score bias ``fn(b, h, q_idx, kv_idx)`` is traced once with ``make_fx``
(at two sets of sizes, to prove it reads only the index values) and its
aten ops are inlined before the site, over ``arange`` index tensors of the
site's own (possibly symbolic) sizes; the bias is added to the site's mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.proxy_tensor import make_fx

import attnrw.opargs as opargs
from attnrw.errors import ConfigError
from attnrw.patterns import expr as E
from attnrw.patterns.graph import val
from attnrw.patterns.match import Match
from attnrw.policies import Keep, Lowering, Policy
from attnrw.policies.base import SITE_ARGS

aten = torch.ops.aten

#: Node metadata the replace pass sets on each op it emits: the site (a dict) and the Policy object.
SITE_META = "attnrw_site"
POLICY_META = "attnrw_policy"


@dataclass(frozen=True)
class SiteCall:
    """What one site becomes: ``op`` with ``values`` (its arguments after the six site arguments) by name."""

    op: Any
    values: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    score_bias: Callable[..., Any] | None = None
    kept: bool = False  # the policy kept the site dense (a Keep)

    @property
    def op_name(self) -> str:
        return str(self.op.name()).split("::")[-1].split(".")[0]


def lower_site(m: Match, policy: Policy) -> SiteCall:
    """Ask ``policy`` how to lower the site of ``m``; a :class:`Keep` becomes the dense op with its reason."""
    lowering = policy.lower(m.site)
    if isinstance(lowering, Keep):
        return _kept(m, lowering.reason)
    if not isinstance(lowering, Lowering):
        raise TypeError(
            f"{type(policy).__name__}.lower() must return attnrw.Lowering or attnrw.Keep, got {lowering!r}"
        )
    op = lowering.op
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"{type(policy).__name__}.lower(): Lowering.op must be an OpOverload (e.g. "
                        f"torch.ops.ns.name.default), got {op!r}")
    names = tuple(opargs.arg_names(op)[: len(SITE_ARGS)])
    if names != SITE_ARGS:
        raise TypeError(f"{op.name()}'s schema must start with ({', '.join(SITE_ARGS)}); it starts with "
                        f"({', '.join(names)})")
    if m.softcap and "softcap" not in opargs.arg_names(op):
        return _kept(m, f"{op.name()} has no softcap argument; the site caps its scores (softcap {m.softcap:g})")
    values = {"is_causal": m.is_causal, **_softcap_value(m), **dict(lowering.kwargs)}
    clash = sorted(set(lowering.kwargs) & {*SITE_ARGS, "softcap"} - {"is_causal"})
    if clash:
        raise TypeError(f"{type(policy).__name__}.lower(): Lowering.kwargs may not set {', '.join(clash)} "
                        "(the pass fills them from the site)")
    try:
        opargs.call_args(op, {**dict.fromkeys(SITE_ARGS), **values})
    except TypeError as e:
        raise TypeError(f"{type(policy).__name__}.lower(): {e}") from None
    return SiteCall(op, values, lowering.note, lowering.score_bias)


def _kept(m: Match, reason: str) -> SiteCall:
    """The site as the exact dense op, with why the policy's op was not used."""
    return SiteCall(torch.ops.attnrw.attention.default, {"is_causal": m.is_causal, **_softcap_value(m)}, reason,
                    kept=True)


def _softcap_value(m: Match) -> dict[str, float]:
    """``{"softcap": c}`` for a capped site; nothing otherwise, so ops without the argument stay callable."""
    return {"softcap": m.softcap} if m.softcap else {}


def _site_values(m: Match, call: SiteCall, q: Any, k: Any, v: Any, mask: Any) -> dict[str, Any]:
    return {"q": q, "k": k, "v": v, "attn_mask": mask, "scale": float(m.scale), **call.values}


def emit_site(emitter: Any, m: Match, call: SiteCall) -> Node:
    """Emit the call of one site at the graph's insertion point (an :class:`~attnrw.rewriter.emit.Emitter`)."""
    q, k, v = emitter.emit(m.q), emitter.emit(m.k), emitter.emit(m.v)
    mask = emitter.emit(m.mask) if m.mask is not None else None
    if call.score_bias is not None:
        mask = _emit_bias(emitter, call.score_bias, q, k, mask)
    return emitter.call_named(call.op, _site_values(m, call, q, k, v, mask))


def call_site(m: Match, call: SiteCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """Run the call of one site on tensors in the canonical layout."""
    if call.score_bias is not None:
        b, h, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        idx = _index_tensors(b, h, sq, sk, q.device)
        mask = _with_bias(call.score_bias(*idx), mask, q.dtype)
    args, kwargs = opargs.call_args(call.op, _site_values(m, call, q, k, v, mask))
    return call.op(*args, **kwargs)


# -- score bias ---------------------------------------------------------------------------


def _index_tensors(b: Any, h: Any, sq: Any, sk: Any, device: Any) -> tuple[torch.Tensor, ...]:
    """Broadcasting int64 index tensors (B,1,1,1), (1,H,1,1), (1,1,Sq,1), (1,1,1,Sk)."""
    sizes = (b, h, sq, sk)
    out = []
    for axis, n in enumerate(sizes):
        shape = [1, 1, 1, 1]
        shape[axis] = -1
        out.append(torch.arange(n, device=device).view(shape))
    return tuple(out)


def _with_bias(bias: Any, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as an additive float mask plus ``bias``."""
    if not isinstance(bias, torch.Tensor):
        raise ConfigError(f"a score bias must return a tensor, got {type(bias).__name__}")
    bias = bias.to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, float("-inf"))
    return bias + mask.to(dtype)


@functools.lru_cache(maxsize=64)
def _bias_graph(fn: Callable[..., Any]) -> Graph:
    """``fn`` traced to aten over the four index tensors; refused where it reads sizes or holds tensors."""
    traced = []
    for sizes in ((2, 3, 5, 7), (3, 4, 6, 9)):
        try:
            gm = make_fx(lambda b, h, q_idx, kv_idx: fn(b, h, q_idx, kv_idx))(*_index_tensors(*sizes, "cpu"))
        except Exception as e:
            raise ConfigError(f"the score bias {_fn_name(fn)} could not be traced: {type(e).__name__}: {e}") from e
        if any(n.op == "get_attr" for n in gm.graph.nodes):
            raise ConfigError(
                f"the score bias {_fn_name(fn)} holds tensor constants; write it from the index tensors "
                "and Python numbers only (e.g. torch.where((kv_idx >= 3) & (kv_idx < 7), 2.0, 0.0))"
            )
        traced.append(gm)
    if traced[0].code != traced[1].code:
        raise ConfigError(
            f"the score bias {_fn_name(fn)} depends on the sizes of its index tensors (it traces differently "
            "at different lengths); write it from their values only, broadcasting"
        )
    return traced[0].graph


def _emit_bias(emitter: Any, fn: Callable[..., Any], q: Node, k: Node, mask: Any) -> Node:
    graph = _bias_graph(fn)
    device = val(q).device
    env: dict[Node, Any] = {}
    placeholders = iter([E.SizeOf(q, 0), E.SizeOf(q, 1), E.SizeOf(q, 2), E.SizeOf(k, 2)])
    out: Any = None
    for axis, node in enumerate(graph.nodes):
        if node.op == "placeholder":
            n = emitter.emit(next(placeholders))
            shape = [1, 1, 1, 1]
            shape[axis] = -1
            idx = emitter.call(aten.arange.default, (n,), {"dtype": torch.int64, "device": device})
            env[node] = emitter.call(aten.view.default, (idx, shape))
        elif node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: env[a])
            env[node] = emitter.call(node.target, args, kwargs)
        elif node.op == "output":
            (result,) = node.args
            out = env[result] if isinstance(result, Node) else result
    if not isinstance(out, Node) or not isinstance(val(out), torch.Tensor):
        raise ConfigError(f"the score bias {_fn_name(fn)} must return a tensor")
    dtype = val(q).dtype
    bias = emitter.call(aten._to_copy.default, (out,), {"dtype": dtype})
    if mask is None:
        return bias
    mv = val(mask)
    if mv.dtype == torch.bool:
        return emitter.call(aten.where.ScalarOther, (mask, bias, float("-inf")))
    if mv.dtype != dtype:
        mask = emitter.call(aten._to_copy.default, (mask,), {"dtype": dtype})
    return emitter.call(aten.add.Tensor, (bias, mask))


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


__all__ = ["POLICY_META", "SITE_META", "SiteCall", "call_site", "emit_site", "lower_site"]
