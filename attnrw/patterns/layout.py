"""Axis algebra through layout ops: which axes of a source tensor each axis of a later tensor holds.

A chain of views, permutes, transposes, unsqueezes, squeezes, clones and casts
maps the axes of a source tensor onto the axes of its result. Each axis of the
result is tracked as the run of source axes it holds, in row-major order
(``()`` for an axis of size 1). The chain composes exactly, whatever order its
nodes come in: two permutes that undo each other leave every axis where it
was, a view that folds two source axes gives one axis holding both. ``einsum``
decomposes into such chains around its ``bmm`` (HF Funnel and XLNet's
``bnij,jbnd->ibnd``), as does a ``transpose`` before a product.

The trail ends (:class:`Lost`) at an op that splits a source axis, mixes two
of them out of order, broadcasts, or is not a layout op: past it, what an
axis holds is not proven.
"""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from attnrw.patterns.graph import ORDER_PRESERVING, aten, is_cast, is_order_preserving, same, same_shape, shape

#: For each axis, the source axes it holds, outermost first.
Groups = tuple[tuple[int, ...], ...]


class Lost(Exception):
    """The axes of a node's output cannot be told from those of its input; the message says why
    (empty when the node is simply not a layout op)."""


def source_groups(dims: tuple) -> Groups:
    """The groups of a source tensor: axis ``i`` holds itself, except axes of size 1, which hold nothing."""
    return tuple(() if same(d, 1) else (i,) for i, d in enumerate(dims))


def labels(groups: Groups) -> tuple[int, ...]:
    """The source axes held, in row-major order."""
    return tuple(a for g in groups for a in g)


def step(node: Node, groups: Groups, sizes: tuple) -> Groups:
    """The groups of ``node``'s output, given those of its first input; ``sizes`` are the source's dims."""
    t = node.target
    src = node.args[0]
    rank = len(groups)
    if t is aten.permute.default:
        perm = [p % rank for p in node.args[1]]
        return tuple(groups[p] for p in perm)
    if t is aten.transpose.int:
        a, b = node.args[1] % rank, node.args[2] % rank
        out = list(groups)
        out[a], out[b] = out[b], out[a]
        return tuple(out)
    if t is aten.t.default:
        return tuple(reversed(groups))
    if t is aten.expand.default:
        if not same_shape(shape(src), shape(node)):
            raise Lost("the probabilities are broadcast (expand) before the product with values")
        return groups
    if t in ORDER_PRESERVING or is_order_preserving(node) or is_cast(node):
        return regroup(groups, sizes, shape(node))
    raise Lost("")


#: Ops that move axes; with views they make the chains :func:`keeps_order` checks.
AXIS_MOVES = {aten.permute.default, aten.transpose.int, aten.t.default}


def _composed(chain: list[Node]) -> tuple[Groups, Groups] | None:
    """The groups of ``chain[0]`` and those of its source ``chain[-1]``; None if the trail is lost."""
    sizes = shape(chain[-1])
    if sizes is None:
        return None
    groups = source = source_groups(sizes)
    try:
        for n in reversed(chain[:-1]):
            groups = step(n, groups, sizes)
    except Lost:
        return None
    return groups, source


def keeps_order(chain: list[Node]) -> bool:
    """Whether ``chain`` (``[result, ..., source]``, each node's first argument the next) holds the source's
    elements in row-major order: the permutes in it cancel out."""
    got = _composed(chain)
    return got is not None and labels(got[0]) == labels(got[1])


def transposes(chain: list[Node]) -> bool:
    """Whether ``chain`` (as for :func:`keeps_order`) is its source with the last two axes swapped, the
    axes before them kept in order."""
    got = _composed(chain)
    if got is None or len(got[0]) < 2 or len(got[1]) < 2:
        return False
    groups, source = got
    return (bool(source[-1]) and bool(source[-2]) and (groups[-2], groups[-1]) == (source[-1], source[-2])
            and labels(groups[:-2]) == labels(source[:-2]))


def regroup(groups: Groups, sizes: tuple, out: tuple | None) -> Groups:
    """The groups after a reshape to ``out``: each axis takes the next run of source axes whose sizes
    multiply to its own (reshapes keep the row-major order of elements)."""
    if out is None:
        raise Lost("a view of the probabilities has no known shape")
    todo = list(labels(groups))
    result: list[tuple[int, ...]] = []
    for d in out:
        if same(d, 1):
            result.append(())
            continue
        run: list[int] = []
        size: Any = 1
        while todo and not same(size, d):
            run.append(todo.pop(0))
            size = size * sizes[run[-1]]
        if not same(size, d):
            raise Lost("a view splits an axis of the probabilities")
        result.append(tuple(run))
    if todo:
        raise Lost("a view splits an axis of the probabilities")
    return tuple(result)

