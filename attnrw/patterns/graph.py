"""Read-only helpers over aten FX graphs: values, shapes, op families, module paths."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims

# Ops that keep the row-major order of elements: a chain of them from T to X
# means X == T.reshape(X.shape). (An expand only when it does not broadcast,
# a permute/transpose only when it is the identity; checked separately.)
ORDER_PRESERVING = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.contiguous.default,
    aten.view_copy.default,
}
MAYBE_IDENTITY = {aten.expand.default, aten.permute.default, aten.transpose.int, aten._to_copy.default}

CASTS = {aten._to_copy.default, prims.convert_element_type.default, aten.to.dtype, aten.to.dtype_layout}

SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}

PRODUCTS = {aten.bmm.default, aten.mm.default, aten.matmul.default, aten.baddbmm.default}

DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}


def val(node: Any) -> Any:
    """The example value (usually a FakeTensor) recorded on a node, or the constant itself."""
    if isinstance(node, Node):
        v = node.meta.get("val", node.meta.get("example_value"))
        return v
    return node


def tensor_val(node: Any) -> torch.Tensor | None:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> tuple | None:
    t = tensor_val(node)
    return tuple(t.shape) if t is not None else None


def hint(x: Any) -> int:
    """A concrete int for a dim that may be symbolic (its example value)."""
    if isinstance(x, torch.SymInt):
        h = x.node.hint
        if h is not None:
            return int(h)
        return int(x.node.shape_env.size_hint(x.node.expr))
    return int(x)


def hints(dims: Iterable[Any]) -> tuple[int, ...]:
    return tuple(hint(d) for d in dims)


def same(a: Any, b: Any) -> bool:
    """True when two dims are provably equal (without adding guards)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - defensive: unknown symbolic forms
        return False


def same_shape(a: Sequence[Any] | None, b: Sequence[Any] | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def numel(dims: Sequence[Any]) -> Any:
    out: Any = 1
    for d in dims:
        out = out * d
    return out


def is_identity_layout(node: Node) -> bool:
    """Whether a node of ``MAYBE_IDENTITY`` leaves its input's elements where they are."""
    t = node.target
    src = node.args[0]
    if t is aten.expand.default:
        return same_shape(shape(src), shape(node))
    if t in (aten.permute.default, aten.transpose.int):
        # Moving only size-1 axes keeps the row-major order (einsum's
        # decomposition does this a lot).
        in_shape = shape(src)
        if in_shape is None:
            return False
        rank = len(in_shape)
        if t is aten.permute.default:
            perm = [p % rank for p in node.args[1]]
        else:
            perm = list(range(rank))
            a, b = node.args[1] % rank, node.args[2] % rank
            perm[a], perm[b] = perm[b], perm[a]
        moved = [p for p in perm if not same(in_shape[p], 1)]
        return moved == sorted(moved)
    if t is aten._to_copy.default:
        sv, nv = tensor_val(src), tensor_val(node)
        return sv is not None and nv is not None and sv.dtype == nv.dtype and sv.device == nv.device
    return False


def is_order_preserving(node: Any) -> bool:
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target in ORDER_PRESERVING:
        return True
    if node.target in DROPOUT:
        return is_eval_dropout(node) and node.target is not aten.native_dropout.default
    if node.target is operator.getitem:
        src = node.args[0]
        return (
            isinstance(src, Node)
            and src.target is aten.native_dropout.default
            and node.args[1] == 0
            and is_eval_dropout(src)
        )
    return node.target in MAYBE_IDENTITY and is_identity_layout(node)


def is_eval_dropout(node: Node) -> bool:
    """Dropout that is the identity: eval mode (``train=False``) or ``p == 0``."""
    args = list(node.args) + [None] * 3
    p = args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return train is False or p == 0


def is_cast(node: Any) -> bool:
    if not isinstance(node, Node) or node.op != "call_function" or node.target not in CASTS:
        return False
    if node.target is aten._to_copy.default:
        sv, nv = tensor_val(node.args[0]), tensor_val(node)
        return sv is not None and nv is not None and sv.device == nv.device
    return True


#: Metadata checks ``torch.export`` inserts (e.g. for ``.to()``); they are not uses of a value.
ASSERTS = {aten._assert_tensor_metadata.default}


def real_users(node: Node) -> list[Node]:
    """Users of a node other than metadata assertions."""
    return [u for u in node.users if u.target not in ASSERTS]


def module_path(node: Node) -> str:
    """The innermost module a node runs in, as a dotted path (``encoder.layer.3.attention``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    raw = list(stack.values())[-1][0]
    path = normalize_module_path(raw)
    # (meta is deep-copied along the way: compare op names, not objects)
    if str(node.meta.get("original_aten")) == "aten._transformer_encoder_layer_fwd.default":
        # The fused encoder-layer op runs under the layer; its attention is
        # the layer's ``self_attn`` module, where torch.export places it.
        path = f"{path}.self_attn" if path else "self_attn"
    return path


#: Where dynamo says the traced frame found the model: a local (``L['self']``,
#: ``L['model']``, ``L['fn'].__self__``), one positional or keyword argument of a
#: wrapper (``L['args'][0]``, ``L['kwargs']['model']``; transformers wraps
#: ``forward`` as ``wrapped_func(*args, **kwargs)``), a global, or the mangled
#: name of any of these. What follows it is the path inside the model.
_DYNAMO_ROOT = re.compile(
    r"""^(?:
        (?:L|G)\[(?:'args'|"args")\]\[\d+\]
      | (?:L|G)\[(?:'kwargs'|"kwargs")\]\[(?:'[^']*'|"[^"]*")\]
      | (?:L|G)\[(?:'[^']*'|"[^"]*")\]
      | L__\w+?__
      | self
    )(?:\.__self__|\.__func__)*\.?""",
    re.VERBOSE,
)


def normalize_module_path(raw: str) -> str:
    """The path of a module inside the model, from dynamo's source or export's path.

    Dynamo's ``L['self'].encoder.layer[3]._modules['attn']`` and
    ``L['args'][0].encoder.layer.3.attn`` and export's ``encoder.layer.3.attn``
    all give ``encoder.layer.3.attn``: a site has one name whatever way in.
    """
    s = raw
    while True:  # getattr(getattr(X, 'a'), 'b') -> X.a.b, innermost first
        t = re.sub(r"getattr\(([^()]*),\s*['\"](\w+)['\"]\)", r"\1.\2", s)
        if t == s:
            break
        s = t
    s = _DYNAMO_ROOT.sub("", s)
    s = s.replace("._modules", "")
    s = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", s)
    s = re.sub(r"\[(\d+)\]", r".\1", s)
    s = re.sub(r"\.+", ".", s).strip(".")
    return s


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def walk_order_preserving(node: Any) -> list[Any]:
    """``[node, parent, grandparent, ...]`` back through order-preserving ops."""
    chain = [node]
    while is_order_preserving(chain[-1]):
        chain.append(chain[-1].args[0])
    return chain


def ancestors(nodes: Iterable[Any], stop: set[Node] | None = None) -> set[Node]:
    """All nodes the given nodes depend on (inclusive)."""
    seen: set[Node] = set()
    todo = [n for n in nodes if isinstance(n, Node)]
    while todo:
        n = todo.pop()
        if n in seen or (stop is not None and n in stop):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def view_groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of the non-1 axes of the two shapes of a view whose products match.

    ``[([0], [0]), ([1, 2], [1])]``: axis 0 stays, axes 1 and 2 fold into one;
    None when the shapes do not line up that way.
    """
    xa = [(i, s) for i, s in enumerate(a) if s != 1]
    xb = [(j, s) for j, s in enumerate(b) if s != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(xa) and j < len(xb):
        ga, pa, gb, pb = [xa[i][0]], xa[i][1], [xb[j][0]], xb[j][1]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(xa):
                ga.append(xa[i][0])
                pa, i = pa * xa[i][1], i + 1
            elif pb < pa and j < len(xb):
                gb.append(xb[j][0])
                pb, j = pb * xb[j][1], j + 1
            else:
                return None
        out.append((ga, gb))
    return out if i == len(xa) and j == len(xb) else None
