"""The ``tokens`` pass: carry merged tokens through the token-wise layers after a site.

``Merge(mode="tokens")`` sites are first lowered as ``qkv`` (merge, attend,
restore at the site: correct on its own). This pass then walks the graph in
order and, for each such site whose shapes are static, replaces the op by
``attnrw::tokens_attention``, which returns the output on the ``M`` merged
tokens and the token state (:mod:`attnrw.kernels.merge.tokens`). Every node
after it is re-emitted on the reduced tokens when a rule below shows it
*token-wise* (each output token depends only on the same token of its
inputs); values that carry reduced tokens are *carried*.

Token-wise, with the token and batch axes of each carried value tracked:

* layout: ``view``/``reshape`` that keep the token axis whole (or fold it
  with the batch axis, batch-major, as a linear layer's 2-D input does),
  ``permute``, ``transpose``, ``t``, ``unsqueeze``, ``squeeze`` of other
  axes, ``expand``, ``clone``, casts;
* pointwise ops (torch's ``pointwise`` tag) whose other tensor operands are
  carried in the same state or do not vary along the token axis;
* ``linear``, ``mm``, ``addmm``, ``matmul`` with a weight that is not carried;
* ``native_layer_norm``/``layer_norm``, reductions and softmax over axes
  other than the token and batch axes; ``slice``, ``select``, ``split`` of
  other axes.

A residual ``add``/``sub`` whose other operand is not yet reduced the same
way (the block's input, from the original or an earlier token state) gets
that operand merged first (``attnrw::merge_tokens``: the size-weighted mean
of each merged token's members, as ToMe averages the residual stream).
Anything else (an op that mixes tokens, a graph output, another site's
input that cannot follow) receives the value restored to the original
tokens (``attnrw::restore_tokens``), so every value outside a region is
what ``qkv`` mode gives for it. A later ``tokens`` site whose q, k, v are
all carried in one state merges further (reductions compound, ToMe-style);
the attention bias follows the merged tokens (proportional attention,
padding masks via their log-sum-exp over members).

Each rule is also checked on shapes: the re-emitted node's example value
must have the original shape with only the token count changed, or the
node is treated as an exit. A site whose output reaches no token-wise op
keeps its ``qkv`` op, and its report note says which op stopped the region.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

import attnrw.opargs as opargs
from attnrw.patterns.graph import view_groups
from attnrw.rewriter.emit import Emitter
from attnrw.rewriter.lowering import POLICY_META, SITE_META
from attnrw.rewriter.report import Decision

aten = torch.ops.aten


_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_SAME = {aten.clone.default, aten._to_copy.default, aten.alias.default, aten.detach.default,
         aten.contiguous.default, aten.lift_fresh_copy.default}
_SIDE_OK = {aten.add.Tensor, aten.sub.Tensor}
_REDUCE = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.var.correction,
           aten.std.correction, aten.var_mean.correction}
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int}
_SPLIT = {aten.split.Tensor, aten.split_with_sizes.default}


class _Exit(Exception):
    """A node that is not token-wise; the message says why (for the report)."""


@dataclass(eq=False)
class State:
    """The reduced tokens after one site: nodes of its ``index`` (B, N) and ``sizes`` (B, T)."""

    index: Node
    sizes: Node
    prev: State | None
    tokens: int  # T, the merged tokens
    n: int  # N, the original tokens (every token axis of the unmodified graph has N)
    batch: int  # B
    site: Node
    carried_ops: int = 0
    exits: list[str] = field(default_factory=list)

    def descends_from(self, other: State | None) -> bool:
        s: State | None = self
        while s is not None:
            if s is other:
                return True
            s = s.prev
        return other is None


@dataclass(eq=False)
class Carried:
    """A value on reduced tokens: its node, state, token and batch axes (equal: one batch-major axis)."""

    node: Node
    state: State
    tok: int
    batch: int
    tuple_out: bool = False
    restored: Node | None = None


_WEIGHT = {aten.linear.default: "weight", aten.matmul.default: "other", aten.mm.default: "mat2"}


def is_tokens_site(node: Node) -> bool:
    """A ``merged_attention`` node emitted (as ``qkv``) for a ``Merge(mode="tokens")`` site."""
    if node.op != "call_function" or node.target is not torch.ops.attnrw.merged_attention.default:
        return False
    return getattr(node.meta.get(POLICY_META), "mode", None) == "tokens" and opargs.arg(node, "mode") == "qkv"


def _data(node: Node) -> Any:
    """The first argument of a call (the data input of the aten ops this pass knows)."""
    return next(iter(node.args), None)


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, Node) else n


def _static(shape: Any) -> bool:
    return all(isinstance(s, int) for s in shape)


class TokensPass:
    """One run of the pass over a graph (see the module docstring)."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.emitter = Emitter(gm)
        self.carried: dict[Node, Carried] = {}
        self.states: dict[Node, State] = {}  # site node -> its state
        self.fallback: dict[Node, str] = {}  # site node -> why it stays qkv

    # --- driving ---------------------------------------------------------------------------------

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op == "output":
                self._exit_all(node, "graph output")
            elif is_tokens_site(node):
                self._site(node)
            elif node.op == "call_function" and self._carried_inputs(node):
                with self.gm.graph.inserting_before(node):
                    try:
                        self._token_wise(node)
                    except _Exit as e:
                        self._exit_all(node, str(e))
        self._undo_empty_regions()

    def _carried_inputs(self, node: Node) -> list[Carried]:
        out: list[Carried] = []
        for a in node.all_input_nodes:
            c = self.carried.get(a)
            if c is not None and c not in out:
                out.append(c)
        return out

    # --- sites -----------------------------------------------------------------------------------

    def _site(self, node: Node) -> None:
        a = opargs.bind(node)
        q, k, v, mask = a["q"], a["k"], a["v"], a["attn_mask"]
        ins = [self.carried.get(x) for x in (q, k, v)]
        why = None
        if not all(_static(_val(x).shape) for x in (q, k, v)):
            why = "tokens mode needs static shapes (the merged count sets the shapes after the site)"
        elif isinstance(mask, Node) and mask in self.carried:
            why = "the mask depends on carried tokens"
        if why is not None:
            self.fallback[node] = why
            self._exit_all(node, "a site that stays qkv")
            return
        state: State | None = None
        if all(c is not None and _attention_layout(c) for c in ins) and len({id(c.state) for c in ins}) == 1:
            state = ins[0].state  # type: ignore[union-attr]
            args = [c.node for c in ins]  # type: ignore[union-attr]
        else:
            with self.gm.graph.inserting_before(node):
                args = [self._restore(c, "another tokens site's input", x) if c is not None else x
                        for c, x in zip(ins, (q, k, v))]
        with self.gm.graph.inserting_before(node):
            index = state.index if state is not None else None
            sizes = state.sizes if state is not None else None
            op = torch.ops.attnrw.tokens_attention.default
            values = {name: a[name] for name in ("scale", "ratio", "r", "protect", "impl")}
            qn, kn, vn = args
            call = self.emitter.call_named(
                op, dict(q=qn, k=kn, v=vn, attn_mask=mask, index=index, sizes=sizes, **values)
            )
            for key in (SITE_META, POLICY_META, "nn_module_stack"):
                if key in node.meta:
                    call.meta[key] = node.meta[key]
            outs = [self.emitter.call(operator.getitem, (call, i)) for i in range(4)]
        new = State(outs[2], outs[3], state, _val(outs[3]).shape[1], _val(q).shape[2], _val(q).shape[0], node)
        self.states[node] = new
        self.carried[node] = Carried(outs[0], new, 2, 0)

    # --- token-wise nodes ------------------------------------------------------------------------

    def _token_wise(self, node: Node) -> None:
        target = node.target
        ins = self._carried_inputs(node)
        states = [c.state for c in ins]
        state = max(states, key=lambda s: _depth(s))
        if not all(state.descends_from(s) for s in states):
            raise _Exit("values from two unrelated token merges meet")
        if target is operator.getitem:
            tup, item = node.args
            src = self.carried[tup]  # type: ignore[index]
            if not src.tuple_out:
                raise _Exit("getitem of a tensor")
            self._emit_as(node, (src.node, item), {}, src.state, src.tok, src.batch)
            return
        if not isinstance(target, torch._ops.OpOverload):
            raise _Exit(f"{getattr(target, '__name__', target)} is not an aten op")
        out = _val(node)
        if isinstance(out, torch.Tensor) and not _static(out.shape):
            raise _Exit("dynamic shapes")
        a = opargs.bind(node)
        data = _data(node)
        x = self.carried.get(data) if isinstance(data, Node) else None
        if target in _VIEWS or target is aten.expand.default:
            self._one_input(x, ins)
            assert x is not None
            self._view(node, x)
        elif target in (aten.permute.default, aten.transpose.int, aten.t.default):
            self._one_input(x, ins)
            assert x is not None
            nd = _val(data).dim()
            if target is aten.permute.default:
                perm = [d % nd for d in a["dims"]]
            else:
                d0, d1 = (0, 1) if target is aten.t.default else (a["dim0"] % nd, a["dim1"] % nd)
                perm = list(range(nd))
                perm[d0], perm[d1] = perm[d1], perm[d0]
            self._same_args(node, x, perm.index(x.tok), perm.index(x.batch))
        elif target in (aten.unsqueeze.default, aten.squeeze.dim, aten.select.int):
            self._one_input(x, ins)
            assert x is not None
            nd = _val(data).dim()
            d = a["dim"] % (nd + (target is aten.unsqueeze.default))
            if target is aten.unsqueeze.default:
                self._same_args(node, x, x.tok + (x.tok >= d), x.batch + (x.batch >= d))
            else:
                if d in (x.tok, x.batch):
                    raise _Exit(f"{target.__name__} of the token or batch axis")
                self._same_args(node, x, x.tok - (x.tok > d), x.batch - (x.batch > d))
        elif target in _SAME:
            self._one_input(x, ins)
            assert x is not None
            self._same_args(node, x, x.tok, x.batch)
        elif target in _WEIGHT:
            self._matmul(node, x, ins, a[_WEIGHT[target]])
        elif target is aten.addmm.default:
            x = self.carried.get(a["mat1"])
            bias = _val(a["self"])
            if x is None or (bias.dim() == 2 and bias.shape[0] != 1):
                raise _Exit("addmm whose bias varies by row")
            self._matmul(node, x, ins, a["mat2"])
        elif target in (aten.native_layer_norm.default, aten.layer_norm.default):
            self._one_input(x, ins)
            assert x is not None
            nd = _val(data).dim()
            if max(x.tok, x.batch) >= nd - len(a["normalized_shape"]):
                raise _Exit("layer norm over the token axis")
            self._same_args(node, x, x.tok, x.batch, tuple_out=target is aten.native_layer_norm.default)
        elif target in _REDUCE or target in _SOFTMAX or target in _SPLIT or target is aten.slice.Tensor:
            self._reduce(node, x, ins)
        elif torch.Tag.pointwise in target.tags:
            self._pointwise(node, ins, state)
        else:
            raise _Exit(f"{target.name()} is not known to be token-wise")

    @staticmethod
    def _one_input(x: Carried | None, ins: list[Carried]) -> None:
        if x is None or len(ins) != 1:
            raise _Exit("a carried value in an operand that is not the data input")

    def _matmul(self, node: Node, x: Carried | None, ins: list[Carried], weight: Any) -> None:
        if x is None or len(ins) != 1 or self.carried.get(weight) is not None:
            raise _Exit("a product of two token-dependent values (mixes tokens)")
        xv, w = _val(x.node), _val(weight)
        if w.dim() != 2 or max(x.tok, x.batch) >= xv.dim() - 1:
            raise _Exit("a product over the token axis")
        self._same_args(node, x, x.tok, x.batch)

    def _reduce(self, node: Node, x: Carried | None, ins: list[Carried]) -> None:
        self._one_input(x, ins)
        assert x is not None
        target = node.target
        a = opargs.bind(node)
        nd = _val(_data(node)).dim()
        dims: Any = a.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            raise _Exit(f"{_name(node)} over all axes")
        dims = [d % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if x.tok in dims or x.batch in dims:
            raise _Exit(f"{_name(node)} over the token or batch axis")
        keep = True if target in _SOFTMAX or target in _SPLIT or target is aten.slice.Tensor else bool(
            a.get("keepdim") or False
        )
        tok, batch = x.tok, x.batch
        if not keep:
            tok -= sum(d < x.tok for d in dims)
            batch -= sum(d < x.batch for d in dims)
        self._same_args(node, x, tok, batch, tuple_out=target in _SPLIT or target is aten.var_mean.correction)

    def _pointwise(self, node: Node, ins: list[Carried], state: State) -> None:
        out = _val(node)
        if not isinstance(out, torch.Tensor):
            raise _Exit("pointwise op without a tensor output")
        nd = out.dim()
        positions = {(c.tok + nd - _val(c.node).dim(), c.batch + nd - _val(c.node).dim()) for c in ins}
        if len(positions) != 1:
            raise _Exit("carried operands with their tokens on different axes")
        tok, batch = positions.pop()
        n_orig = _val(node).shape[tok]

        def arg(a: Any) -> Any:
            if not isinstance(a, Node):
                return a
            c = self.carried.get(a)
            if c is not None:
                if c.state is state:
                    return c.node
                if node.target not in _SIDE_OK:
                    raise _Exit("operands reduced by different merges meet in a non-additive op")
                return self._merge(c.node, c.state, state, c.tok, c.batch)
            av = _val(a)
            if not isinstance(av, torch.Tensor) or av.dim() < nd - tok:
                return a
            p = tok - (nd - av.dim())
            size = av.shape[p]
            if size == 1:
                return a
            if size != n_orig or node.target not in _SIDE_OK:
                raise _Exit(f"{node.target.name()} with an operand that varies along the tokens")  # type: ignore
            b = batch - (nd - av.dim())
            if b < 0:
                raise _Exit("a token-dependent operand without a batch axis")
            return self._merge(a, None, state, p, b)

        args = tuple(arg(a) for a in node.args)
        kwargs = {k: arg(v) for k, v in node.kwargs.items()}
        self._emit_as(node, args, kwargs, state, tok, batch)

    # --- emitting --------------------------------------------------------------------------------

    def _view(self, node: Node, x: Carried) -> None:
        old_in, old_out = list(_val(_data(node)).shape), list(_val(node).shape)
        if node.target is aten.expand.default:
            if len(old_out) != len(old_in):
                raise _Exit("expand that adds axes")
            tok, batch = x.tok, x.batch
        else:
            mapped = _map_view(old_in, x.tok, x.batch, old_out, x.state.n, x.state.batch)
            if mapped is None:
                raise _Exit("a view that splits the token axis or folds it with features")
            tok, batch = mapped
        shape = list(old_out)
        shape[tok] = old_out[tok] // x.state.n * x.state.tokens
        a = opargs.bind(node)
        a["self"] = x.node
        a["shape" if node.target is aten.reshape.default else "size"] = shape
        args, kwargs = opargs.call_args(node.target, a)
        self._emit_as(node, args, kwargs, x.state, tok, batch)

    def _same_args(self, node: Node, x: Carried, tok: int, batch: int, tuple_out: bool = False) -> None:
        """Re-emit ``node`` with its one carried input ``x`` replaced (callers check there is one)."""
        args = tuple(x.node if isinstance(a, Node) and self.carried.get(a) is x else a for a in node.args)
        self._emit_as(node, args, dict(node.kwargs), x.state, tok, batch, tuple_out)

    def _emit_as(self, node: Node, args: tuple, kwargs: dict, state: State, tok: int, batch: int,
                 tuple_out: bool = False) -> None:
        try:
            new = self.emitter.call(node.target, args, kwargs)
        except Exception as e:  # the rule was wrong for these strides/shapes: not carried
            raise _Exit(f"{_name(node)} does not run on the reduced tokens ({type(e).__name__})") from None
        if not tuple_out and not _same_but_tokens(_val(node), _val(new), tok, batch):
            self.gm.graph.erase_node(new)
            raise _Exit(f"{_name(node)} changes more than the token count")
        for key in ("nn_module_stack", "stack_trace"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        self.carried[node] = Carried(new, state, tok, batch, tuple_out)
        state.carried_ops += 1

    def _merge(self, x: Node, src: State | None, dst: State, tok: int, batch: int) -> Node:
        return self.emitter.call_named(
            torch.ops.attnrw.merge_tokens.default,
            dict(x=x, src_index=src.index if src else None, src_sizes=src.sizes if src else None,
                 dst_index=dst.index, dst_sizes=dst.sizes, tok_dim=tok, batch_dim=batch),
        )

    def _restore(self, c: Carried, why: str, like: Node) -> Node:
        """``c`` on the original tokens, in the memory layout of ``like`` (the value it stands for).

        Ops after an exit were traced on the original value: a ``view`` there
        may need its strides (e.g. channels-last from a transposed token axis).
        """
        if c.restored is None:
            if c.tuple_out:
                raise _Exit("a tuple of carried values")
            full = self.emitter.call_named(
                torch.ops.attnrw.restore_tokens.default,
                dict(x=c.node, index=c.state.index, tok_dim=c.tok, batch_dim=c.batch),
            )
            c.restored = self.emitter.restride(full, like)
        c.state.exits.append(why)
        return c.restored

    def _exit_all(self, node: Node, why: str) -> None:
        """Give ``node`` the restored form of every carried input."""
        with self.gm.graph.inserting_before(node):
            for a in node.all_input_nodes:
                c = self.carried.get(a)
                if c is not None:
                    node.replace_input_with(a, self._restore(c, why, a))

    def _undo_empty_regions(self) -> None:
        """Sites whose output feeds no token-wise op keep their qkv op (the merged output is not used)."""
        for site, st in self.states.items():
            if st.carried_ops == 0:
                why = st.exits[0] if st.exits else "nothing uses the merged tokens"
                self.fallback[site] = f"the op after the site is not token-wise ({why})"
                restored = self.carried[site].restored
                if restored is not None:
                    restored.replace_all_uses_with(site)

    def notes(self) -> dict[Node, str]:
        out: dict[Node, str] = {}
        for site, st in self.states.items():
            if site in self.fallback:
                continue
            before = f"{st.n}" if st.prev is None else f"{st.prev.tokens} (carried)"
            exits = sorted(set(st.exits))
            out[site] = (f"tokens: attention on {st.tokens} of {before} tokens, carried through "
                         f"{st.carried_ops} token-wise ops" + (f"; restored for {', '.join(exits)}" if exits else ""))
        for site, why in self.fallback.items():
            out[site] = f"tokens mode fell back to qkv at this site: {why}"
        return out


def _depth(s: State) -> int:
    d = 0
    while s.prev is not None:
        s, d = s.prev, d + 1
    return d


def _name(node: Node) -> str:
    t = node.target
    return t.name() if isinstance(t, torch._ops.OpOverload) else str(getattr(t, "__name__", t))


def _same_but_tokens(old: Any, new: Any, tok: int, batch: int) -> bool:
    if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor) or old.dim() != new.dim():
        return False
    return all(o == n for i, (o, n) in enumerate(zip(old.shape, new.shape)) if i != tok)


def _map_view(old_in: list[int], tok: int, batch: int, old_out: list[int], n: int, b: int) -> tuple[int, int] | None:
    """Where the token and batch axes go in a view from ``old_in`` to ``old_out`` (None: not trackable).

    ``n`` is the token count, ``b`` the batch. The batch axis may hold more
    than the batch (batch-major, e.g. batch × heads); with ``b == 1`` only
    the token axis is tracked (reported as one batch-major axis).
    """
    if -1 in old_out:
        known = math.prod(s for s in old_out if s != -1)
        old_out = [math.prod(old_in) // known if s == -1 else s for s in old_out]
    groups = view_groups(old_in, old_out)
    if groups is None:
        return None
    if b == 1:
        batch = tok
    new_tok = new_batch = None
    for ga, gb in groups:
        if tok in ga:
            if tok == batch:
                if ga != [tok]:
                    return None
                if len(gb) == 1:
                    new_tok = new_batch = gb[0]
                elif len(gb) == 2 and old_out[gb[0]] == b and old_out[gb[1]] == n:
                    new_tok, new_batch = gb[1], gb[0]  # (B·N) -> (B, N)
                else:
                    return None
            elif ga == [batch, tok] and old_in[batch] == b and len(gb) == 1:
                new_tok = new_batch = gb[0]  # (B, N) -> (B·N)
            elif ga == [tok] and len(gb) == 1:
                new_tok = gb[0]
            else:
                return None
        elif batch in ga:
            if ga[0] != batch or old_out[gb[0]] % b:
                return None  # the batch must stay outermost of what it is folded with
            new_batch = gb[0]
    if new_tok is None or new_batch is None:
        return None
    return new_tok, new_batch


def _attention_layout(c: Carried) -> bool:
    """q, k, v of a carried site: (B, H, T, D), or (1, H, T, D) tracked as one batch-major axis."""
    return c.tok == 2 and (c.batch == 0 or (c.batch == 2 and _val(c.node).shape[0] == 1))


def carry_tokens(gm: GraphModule, decisions: list[Decision]) -> list[Decision]:
    """Run the pass on ``gm`` in place; returns the decisions with the tokens notes filled in."""
    sites = [n for n in gm.graph.nodes if is_tokens_site(n)]
    if not sites:
        return decisions
    p = TokensPass(gm)
    p.run()
    key = {n: n.meta.get(SITE_META, {}).get("node", n.name) for n in sites}
    notes = {key[n]: note for n, note in p.notes().items()}
    carried = {key[n] for n in p.states if n not in p.fallback}
    gm.graph.eliminate_dead_code()
    return [
        dataclasses.replace(d, note=_join(d.note, notes[d.node]),
                            op="tokens_attention" if d.node in carried else d.op) if d.node in notes else d
        for d in decisions
    ]


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b
