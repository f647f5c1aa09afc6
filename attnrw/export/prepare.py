"""Graph fixes made to a program before ``torch.onnx.export``: what the exporter would otherwise get wrong.

:func:`broadcast_copies`: ``aten.copy(dst, src)`` broadcasts ``src`` to
``dst``'s shape, but the exporter translates it as a cast of ``src``, so a
smaller ``src`` keeps its own shape in the ONNX graph. That is what an
in-place slice assignment of a scalar becomes (``mask[..., -2:] = False``,
Swin's ``img_mask[:, h, w, :] = cnt``) once the program is decomposed;
onnxruntime then refuses the file ("Transpose ... Invalid attribute perm")
where the exporter's constant folding meets the wrong rank. The copy's
source is expanded to the destination's shape first, which changes nothing
in PyTorch.
"""

from __future__ import annotations

import torch
from torch.fx import Node

import attnrw.opargs as opargs

aten = torch.ops.aten


def broadcast_copies(program: torch.export.ExportedProgram) -> int:
    """Expand the source of every broadcasting ``aten.copy`` in ``program`` (in place); return how many.

    The result is the same: ``copy`` broadcasts anyway. Sizes that are
    symbolic are read from the destination with ``aten.sym_size``.
    """
    graph = program.graph_module.graph
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.copy.default:
            continue
        bound = opargs.bind(node)
        dst, src = bound["self"], bound["src"]
        dv = dst.meta.get("val") if isinstance(dst, Node) else None
        sv = src.meta.get("val") if isinstance(src, Node) else None
        if not isinstance(dv, torch.Tensor) or not isinstance(sv, torch.Tensor) or tuple(sv.shape) == tuple(dv.shape):
            continue
        with graph.inserting_before(node):
            sizes: list[object] = []
            for i, d in enumerate(dv.shape):
                if isinstance(d, int):
                    sizes.append(d)
                else:
                    size = graph.call_function(aten.sym_size.int, (dst, i))
                    size.meta["val"] = d
                    sizes.append(size)
            expanded = graph.call_function(aten.expand.default, (src, sizes))
            expanded.meta = {**src.meta, "val": sv.expand(dv.shape)}
        node.args, node.kwargs = opargs.call_args(aten.copy.default, {**bound, "src": expanded})
        changed += 1
    if changed:
        graph.lint()
        program.graph_module.recompile()
    return changed


__all__ = ["broadcast_copies"]
