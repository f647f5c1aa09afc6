"""Bring every entry point to the one IR the matchers read: an aten-level FX graph.

* ``torch.compile``: dynamo's torch-level graph is traced to aten here, under
  dynamo's fake mode (so symbolic sizes stay symbolic) and with node metadata
  (``nn_module_stack``) preserved. The trace runs without autograd; the
  rewritten graph is then compiled by Inductor (or run as is), which
  differentiates it op by op, the attnrw ops through their own backward.
* ``torch.export``: the program is decomposed with the default table minus
  SDPA, which stays one op.

PyTorch's fused inference fast paths (``_native_multi_head_attention``,
``_transformer_encoder_layer_fwd``) are decomposed into plain ops with SDPA
in the compile trace, so both entry points see the same sites.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.experimental.proxy_tensor import make_fx

from attnrw.patterns.context import MatchContext
from attnrw.patterns.graph import hint
from attnrw.patterns.sdpa import SDPA_OPS
from attnrw.rewriter.fused import FUSED_DECOMPOSITIONS


def trace_to_aten(gm: GraphModule, example_inputs: Sequence[Any]) -> GraphModule:
    """Trace a dynamo graph to aten ops, keeping symbolic shapes and module paths."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]

    def run(*args: Any) -> Any:
        return Interpreter(gm).run(*args)

    with fake_mode, enable_python_dispatcher(), fx_traceback.preserve_node_meta(), torch.no_grad():
        agm = make_fx(
            run,
            decomposition_table=dict(FUSED_DECOMPOSITIONS),
            tracing_mode="real",
            record_module_stack=True,
        )(*fakes)
    out_of_place(agm)
    # Values the model computes and drops (attention weights it does not
    # return) would otherwise look like extra uses of a site.
    agm.graph.eliminate_dead_code()
    agm.recompile()
    return agm


def _functional_form(op: Any) -> Any:
    """The out-of-place twin of a pointwise in-place aten op (``div_.Tensor`` -> ``div.Tensor``), or None."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
        return None
    name = op._schema.name.split("::")[-1]
    args = op._schema.arguments
    if not name.endswith("_") or not args or args[0].alias_info is None or not args[0].alias_info.is_write:
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    twin = getattr(packet, op._overloadname, None) if packet is not None else None
    if twin is None or torch.Tag.pointwise not in twin.tags:
        return None
    return twin


def _is_view(node: Node) -> bool:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    rets = t._schema.returns
    return bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write


def out_of_place(gm: GraphModule) -> None:
    """Replace pointwise in-place ops on fresh intermediates by their out-of-place forms.

    ``scores /= d`` (Falcon) traces as ``div_(scores, d)``, and what follows
    reads the ``div_`` node: ``div(scores, d)`` means the same whenever
    nothing else can see the mutation, that is when ``scores`` and the
    tensors it shares memory with (its base through views, and their other
    views) are not graph inputs and are not read after the op. Anything else
    stays in place (and the matchers then say why a site is not matched).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        twin = _functional_form(node.target) if node.op == "call_function" else None
        if twin is None or not isinstance(_self_arg(node), Node):
            continue
        base = _self_arg(node)
        while _is_view(base) and isinstance(_self_arg(base), Node):
            base = _self_arg(base)
        if base.op != "call_function":
            continue  # a graph input: the mutation is visible to the caller
        family, todo = set(), [base]
        while todo:
            n = todo.pop()
            if n in family:
                continue
            family.add(n)
            todo.extend(u for u in n.users if _is_view(u) and _self_arg(u) is n)
        if any(order[u] > order[node] for n in family for u in n.users if u is not node):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(twin, node.args, dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        order[new] = order[node]


def compile_context(agm: GraphModule, dynamo_gm: GraphModule, example_inputs: Sequence[Any]) -> MatchContext:
    """Concrete placeholder values for mask analysis: dynamo hands backends the real inputs."""
    phs = [n for n in agm.graph.nodes if n.op == "placeholder"]
    names = [n.name for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    values: dict[Node, Any] = {}
    user: set[Node] = set()
    for node, name, x in zip(phs, names, example_inputs):
        if isinstance(x, torch.SymInt):
            values[node] = hint(x)
            continue
        if isinstance(x, torch.Tensor) and not isinstance(x, torch._subclasses.FakeTensor):
            values[node] = x.detach()
        static = isinstance(x, torch.nn.Parameter) or "_parameters_" in name or "_buffers_" in name
        if not static and isinstance(x, torch.Tensor):
            user.add(node)
    return MatchContext(agm, values, user)


def keep_sdpa_table() -> Any:
    table = torch.export.default_decompositions()
    for op in SDPA_OPS:
        table.pop(op, None)
    return table


#: torch's own pytree deprecation, which torch.export raises from inside itself on model outputs
#: such as transformers' ``ModelOutput``: nothing a user of attnrw can act on.
PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def export_program(
    model: torch.nn.Module | torch.export.ExportedProgram,
    args: tuple,
    kwargs: dict | None,
    dynamic_shapes: Any = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` a model (or take a program) and decompose it to the matchers' IR."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION, category=FutureWarning)
        if isinstance(model, torch.export.ExportedProgram):
            ep = model
        else:
            ep = torch.export.export(model, tuple(args), dict(kwargs or {}), dynamic_shapes=dynamic_shapes)
        return ep.run_decompositions(keep_sdpa_table())


def export_context(ep: torch.export.ExportedProgram, args: tuple | None, kwargs: dict | None) -> MatchContext:
    """Concrete placeholder values of a program: its state, constants and the example inputs."""
    from torch.export.graph_signature import InputKind

    gm = ep.graph_module
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values: dict[Node, Any] = {}
    user: set[Node] = set()
    constants: set[Node] = set()
    flat_user: list[Any] | None = None
    if args is not None:
        flat_user = list(torch.utils._pytree.tree_leaves((tuple(args), dict(kwargs or {}))))
    elif getattr(ep, "example_inputs", None) is not None:
        ex_args, ex_kwargs = ep.example_inputs
        flat_user = list(torch.utils._pytree.tree_leaves((tuple(ex_args), dict(ex_kwargs or {}))))
    user_index = 0
    for node, spec in zip(phs, ep.graph_signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            user.add(node)
            if flat_user is not None and user_index < len(flat_user):
                x = flat_user[user_index]
                if isinstance(x, torch.Tensor):
                    values[node] = x.detach()
                elif isinstance(x, (int, float, bool)):
                    values[node] = x
            user_index += 1
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            t = ep.state_dict.get(spec.target)
            if t is None:
                t = ep.constants.get(spec.target)
            if t is not None:
                values[node] = t.detach()
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            constants.add(node)
            t = ep.constants.get(spec.target)
            if isinstance(t, torch.Tensor):
                values[node] = t.detach()
    return MatchContext(gm, values, user, constants)


def _self_arg(node: Node) -> Any:
    """The tensor an in-place or view op acts on (its first argument), or None."""
    return next(iter(node.args), None)


def sync_output_signature(ep: torch.export.ExportedProgram) -> None:
    """After replacing nodes, point the program's output specs at the new output nodes."""
    out = next(n for n in ep.graph.nodes if n.op == "output")
    (outputs,) = out.args
    for spec, node in zip(ep.graph_signature.output_specs, outputs):
        if isinstance(node, Node) and hasattr(spec.arg, "name"):
            spec.arg.name = node.name
