"""The baseline that tells attnrw's failures from the exporter's: a plain ``torch.onnx.export`` of the unmodified model.

:func:`~attnrw.export.to_onnx` calls on it only when something has failed,
so a successful export costs nothing more:

* the export or onnxruntime failed (:func:`diagnose`): a plain export of the
  unmodified model (``dynamo=True``, the same opset and dynamic shapes) is
  exported, loaded and run in onnxruntime on the same inputs. If that fails
  too, and attnrw's failure is not in one of attnrw's own translations, the
  limit is the exporter's or onnxruntime's:
  :class:`~attnrw.errors.ExporterLimitError`, naming the op. Otherwise the
  original error is raised with a note that it is attnrw's.
* verification failed (:func:`baseline_comparisons`): the plain export's own
  error against the eager model on the same inputs, which
  :func:`~attnrw.export.verify.verify_file` states attnrw's error against.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from attnrw.errors import AttnrwError, ExporterLimitError

logger = logging.getLogger("attnrw.export")

#: Where an export can fail: in ``torch.onnx.export``, when onnxruntime loads the file, when it runs it.
STAGES = ("export", "load", "run")

_WHAT = {
    "export": "torch.onnx.export failed",
    "load": "onnxruntime cannot load the file",
    "run": "onnxruntime cannot run the file",
}

# onnxruntime: "Could not find an implementation for Mul(14) node with name 'node_mul_1'".
_ORT_KERNEL = re.compile(r"implementation for (\w+\(\d+\)) node with name '([^']*)'")
# onnxruntime: "... Node (node_x) Op (Foo) ..." / "Non-zero status code returned while running Foo node. Name:'node_x'".
_ORT_NODE_OP = re.compile(r"Node \(([^)]*)\) Op \((\w+)\)")
_ORT_RUNNING = re.compile(r"running (\w+) node\. Name:'([^']*)'")
# torch.onnx: "Error when translating node %name : [...] = call_function[target=torch.ops.aten.foo.default]".
_EXPORT_NODE = re.compile(r"Error when translating node %(\S+) [^\n]*?target=(torch\.ops\.[\w.]+)")


@dataclass(frozen=True)
class Failure:
    """One failed export: where, the op and node the message names (if any), and its innermost message."""

    stage: str
    message: str
    op: str | None = None
    node: str | None = None
    fx_target: str | None = None  # the torch op of the failing FX node, when the exporter named it

    def text(self) -> str:
        where = f" ({self.op}" + (f", node '{self.node}'" if self.node else "") + ")" if self.op else ""
        return f"{_WHAT[self.stage]}{where}: {self.message}"


def _innermost(exc: BaseException) -> BaseException:
    """The root cause along ``__cause__`` (not ``__context__``: a plain export runs while attnrw's error is handled)."""
    return _chain(exc)[-1]


def _short(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(stage: str, exc: BaseException) -> Failure:
    """A :class:`Failure` from an exception raised at ``stage``, with the op and node its message names."""
    full = "\n".join(str(e) for e in _chain(exc))
    if stage == "export":
        m = _EXPORT_NODE.search(full)
        if m:
            target = m.group(2)
            return Failure(stage, _short(_innermost(exc)), target.removeprefix("torch.ops."), m.group(1), target)
        return Failure(stage, _short(_innermost(exc)))
    for pattern, op_first in ((_ORT_KERNEL, True), (_ORT_RUNNING, True), (_ORT_NODE_OP, False)):
        m = pattern.search(full)
        if m:
            op, node = (m.group(1), m.group(2)) if op_first else (m.group(2), m.group(1))
            return Failure(stage, _short(exc), op, node)
    return Failure(stage, _short(exc))


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__
    return out


_FX_TARGET = re.compile(r"target=(torch\.ops\.[\w.]+)")


def node_origin(failure: Failure, onnx_path: Path | None) -> str | None:
    """The torch op (``torch.ops.aten.mul.Tensor``) whose FX node the failing node was exported from, if known.

    The exporter records each ONNX node's FX node (``pkg.torch.onnx.fx_node``
    metadata); an export failure names the FX node's target itself.
    """
    if failure.fx_target is not None:
        return failure.fx_target
    if failure.node is None or onnx_path is None:
        return None
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # the file that failed to load may not parse either
        return None
    for node in _all_nodes(model.graph):
        if node.name == failure.node:
            fx = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
            m = _FX_TARGET.search(fx)
            return m.group(1) if m else None
    return None


def _all_nodes(graph: Any) -> Any:
    """Every node of ``graph`` and of its subgraphs (``Loop`` / ``If`` bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)


def stage_of_runtime_error(exc: BaseException) -> str:
    """``"load"`` when onnxruntime raised ``exc`` while building its session, else ``"run"``."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("_create_inference_session", "InferenceSession"):
            return "load"
        tb = tb.tb_next
    return "run"


@dataclass(frozen=True)
class PlainExport:
    """A plain export's outcome: its file and onnxruntime outputs, or the :class:`Failure`."""

    path: Path | None
    outputs: list[Any] | None = None
    failure: Failure | None = None


def plain_export(
    model: torch.nn.Module, args: tuple, kwargs: dict | None, opset: int, dynamic_shapes: Any, folder: Path
) -> PlainExport:
    """``torch.onnx.export(model, dynamo=True, opset_version=opset)`` of the unmodified model, saved in ``folder``,
    loaded and run in onnxruntime on the inputs (one session); what failed first, if anything."""
    from attnrw.export.verify import flat_user_inputs, onnxruntime_outputs

    path = folder / "plain.onnx"
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(
                model, tuple(args), kwargs=kwargs, dynamo=True, opset_version=opset,
                dynamic_shapes=dynamic_shapes, verbose=False,
            )
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(path)
    except Exception as e:
        return PlainExport(None, failure=describe("export", e))
    finally:
        if chatter.getvalue():
            logger.debug("plain torch.onnx.export: %s", chatter.getvalue().strip())
    inputs = flat_user_inputs(program.exported_program, args, kwargs)
    try:
        outputs = onnxruntime_outputs(path, inputs)
    except AttnrwError:
        raise
    except Exception as e:
        return PlainExport(path, failure=describe(stage_of_runtime_error(e), e))
    return PlainExport(path, outputs)


def _try_plain_export(*args: Any) -> PlainExport | str:
    """:func:`plain_export`, or why it could not be made at all (the inputs do not fit it, ...)."""
    try:
        return plain_export(*args)
    except Exception as e:  # our own comparison failed: say so instead of hiding the real failure behind it
        logger.debug("plain export could not be checked", exc_info=True)
        return f"{type(e).__name__}: {_short(e)}"


def diagnose(
    exc: BaseException,
    stage: str,
    model: torch.nn.Module | None,
    args: tuple,
    kwargs: dict | None,
    opset: int,
    dynamic_shapes: Any,
    folder: Path,
    onnx_path: Path | None = None,
) -> BaseException:
    """The error to raise for attnrw's export failing at ``stage`` with ``exc``.

    :class:`~attnrw.errors.ExporterLimitError` when a plain export of the
    unmodified ``model`` fails too and attnrw's failure is not in one of its
    own translations; otherwise ``exc`` itself, with a note saying whose the
    failure is. ``model`` ``None`` (``to_onnx`` was given a program): no plain
    export can be made, and only the failing node decides.
    """
    ours = describe(stage, exc)
    origin = node_origin(ours, onnx_path)
    in_attnrw = None if origin is None else origin.startswith("torch.ops.attnrw.")
    op_text = f" ({ours.op})" if ours.op else ""
    where = f"the failing node comes from {origin.removeprefix('torch.ops.')} in the model" if origin else ""
    if model is None:
        if in_attnrw is False:
            return ExporterLimitError(
                f"the limit is the exporter's or onnxruntime's{op_text}, not attnrw's: {ours.text()}; {where}, "
                "not from an attnrw translation (not checked against a plain export: pass the nn.Module to "
                "to_onnx to compare).",
                op=ours.op, stage=stage,
            )
        return _noted(exc, "to_onnx was given a program, so no plain export of the unmodified model could be "
                           "compared; pass the nn.Module to tell attnrw's failures from the exporter's")
    logger.info("attnrw's export failed at %s; trying a plain torch.onnx.export of the unmodified model", stage)
    plain = _try_plain_export(model, args, kwargs, opset, dynamic_shapes, folder)
    if isinstance(plain, str):
        return _noted(exc, f"a plain torch.onnx.export of the unmodified model could not be checked ({plain})")
    if plain.failure is None:
        return _noted(exc, f"a plain torch.onnx.export of the unmodified model (opset {opset}) exports, loads and "
                           "runs in onnxruntime, so this failure is attnrw's: report it with the model")
    if in_attnrw:
        return _noted(exc, f"{where.replace(' in the model', '')}, so this failure is attnrw's, although a plain "
                           f"export fails too, elsewhere: {plain.failure.text()}")
    # The same op at the same stage; or, where neither message names an op (the exporter's decomposition
    # step), the same message at the same stage: the plain export hit the very error attnrw's did.
    same = ours.stage == plain.failure.stage and (
        ours.op == plain.failure.op if ours.op is not None else plain.failure.op is None
        and ours.message == plain.failure.message
    )
    if in_attnrw is None and not same:
        return _noted(exc, f"a plain torch.onnx.export of the unmodified model fails too, but differently "
                           f"({plain.failure.text()}), and the failing node could not be traced to its source: "
                           "this failure may be attnrw's")
    earlier = STAGES.index(plain.failure.stage) < STAGES.index(stage)
    how = "the same way" if same else f"{'earlier, ' if earlier else ''}at {plain.failure.stage}"
    return ExporterLimitError(
        f"the limit is the exporter's or onnxruntime's{op_text}, not attnrw's: {ours.text()}"
        f"{'; ' + where if where else ''}; a plain torch.onnx.export of the unmodified model (dynamo=True, "
        f"opset {opset}) fails too, {how}: {plain.failure.text()}. Try another opset (18..25) or dtype, or "
        "replace the op in the model.",
        op=ours.op or plain.failure.op, stage=stage,
    )


def _noted(exc: BaseException, note: str) -> BaseException:
    exc.add_note(note)
    return exc


def baseline_comparisons(
    model: torch.nn.Module, args: tuple, kwargs: dict | None, opset: int, dynamic_shapes: Any, folder: Path,
    atol: float | None,
) -> list[Any] | str:
    """The plain export's own errors against the eager model on the inputs, per output; or why there are none."""
    from attnrw.export.verify import compare

    plain = _try_plain_export(model, args, kwargs, opset, dynamic_shapes, folder)
    if isinstance(plain, str):
        return f"a plain torch.onnx.export of the unmodified model could not be checked ({plain})"
    if plain.failure is not None:
        return f"a plain torch.onnx.export of the unmodified model fails ({plain.failure.text()})"
    with torch.no_grad():
        out = model(*args, **(kwargs or {}))
    eager = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    got = plain.outputs or []
    if len(got) != len(eager):
        return f"the plain export returns {len(got)} outputs, the eager model {len(eager)}"
    return compare(eager, got, atol)
