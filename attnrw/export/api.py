"""``to_onnx``: rewrite (or take) a ``torch.export`` program, translate it to ONNX, verify, write atomically."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from attnrw.config import PolicySpec
from attnrw.errors import AttnrwError, ConfigError
from attnrw.files import check_output, write_atomically
from attnrw.policies import Dense
from attnrw.shapes import dynamic_seq_errors, dynamic_seq_shapes
from attnrw.export.plain import baseline_comparisons, diagnose, stage_of_runtime_error
from attnrw.export.prepare import broadcast_copies
from attnrw.export.registry import check_translatable, translation_table
from attnrw.export.verify import verify_file

logger = logging.getLogger("attnrw.export")

#: Opsets ``to_onnx`` writes. 18 is the oldest the PyTorch exporter targets;
#: 25 the newest onnxruntime 1.32 runs (at 26 it has no ``Attention``).
MIN_OPSET = 18
MAX_OPSET = 25
DEFAULT_OPSET = 23


def supported_opsets() -> range:
    """The opsets :func:`to_onnx` accepts, bounded by what the installed ``onnx`` knows."""
    import onnx

    return range(MIN_OPSET, min(MAX_OPSET, onnx.defs.onnx_opset_version()) + 1)


def check_opset(opset: Any) -> int:
    """The opset to use; ``ConfigError`` naming the supported range otherwise."""
    if opset is None:
        return DEFAULT_OPSET
    ok = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in ok:
        raise ConfigError(
            f"opset must be an int in [{ok.start}, {ok.stop - 1}], got {opset!r}; "
            f"use {DEFAULT_OPSET} (the default) for the native Attention kernel of onnxruntime"
        )
    return opset


def _has_symbolic_inputs(program: torch.export.ExportedProgram) -> bool:
    for node in program.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape):
            return True
    return False


def _unwrap_attnrw_error(exc: BaseException) -> AttnrwError | None:
    """The attnrw error a translation raised, if the exporter wrapped one in its own errors."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, AttnrwError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def export_program(
    program: torch.export.ExportedProgram,
    args: tuple,
    kwargs: dict | None,
    opset: int,
    table: Mapping[Any, Callable[..., Any]] | None = None,
) -> Any:
    """``torch.onnx.export`` of a program with attnrw's translations; returns the ``ONNXProgram``.

    ``table`` replaces :func:`translation_table` (benchmarks swap in other chunk sizes).
    """
    table = dict(translation_table(opset) if table is None else table)
    check_translatable(program, table)
    if broadcast_copies(program):
        logger.debug("expanded the source of broadcasting aten.copy nodes (see attnrw.export.prepare)")
    # The exporter reports progress with print(); the library never prints, so it goes to the log.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            onnx_program = torch.onnx.export(
                program,
                tuple(args),
                kwargs=kwargs,
                dynamo=True,
                opset_version=opset,
                custom_translation_table=table,
                verbose=False,
                optimize=False,  # done below, without the fusions that break dynamic lengths
            )
    except Exception as e:
        inner = _unwrap_attnrw_error(e)
        if inner is not None:
            raise inner from e
        raise
    finally:
        if chatter.getvalue():
            logger.debug("torch.onnx.export: %s", chatter.getvalue().strip())
    if onnx_program is None:  # only for the legacy exporter; kept for the type checker
        raise RuntimeError("torch.onnx.export returned no program")
    _optimize(onnx_program.model)
    return onnx_program


def _optimize(model: Any) -> None:
    """What ``torch.onnx.export(optimize=True)`` does, minus the opset-23 fusions on dynamic shapes.

    The exporter's optimizer also fuses RMSNorm / RoPE / GQA patterns into
    opset-23 ops. With a dynamic sequence its ``RotaryEmbedding`` fusion hands
    onnxruntime cos/sin caches of batch 1 without position ids, which
    onnxruntime 1.32 rejects at run time (HF Llama: "Inputs 'cos_cache' and
    'sin_cache' are expected to have the same shape as input 'x'"). Static
    exports keep the fusions; verification checks them either way.
    """
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    onnxscript.optimizer.optimize_ir(model)
    dynamic = any(isinstance(d, ir.SymbolicDim) for v in model.graph.inputs if v.shape is not None for d in v.shape)
    if dynamic:
        logger.debug("dynamic input shapes: skipping the opset-23 RMSNorm/RoPE/GQA fusions")
    else:
        onnxscript.rewriter.onnx_fusions.fuse(model)


def to_onnx(
    model_or_program: torch.nn.Module | torch.export.ExportedProgram,
    args: tuple,
    path: str | os.PathLike,
    kwargs: dict | None = None,
    policy: PolicySpec = Dense(),
    opset: int | None = None,
    dynamic_seq: bool = False,
    verify: bool = True,
    *,
    force: bool = False,
    dynamic_shapes: Any = None,
    atol: float | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write an ONNX file that onnxruntime runs, with attnrw's rewrites as standard operators.

    Args:
        model_or_program: an ``nn.Module`` (rewritten with :func:`attnrw.rewrite`
            under ``policy``) or a ``torch.export.ExportedProgram`` (e.g. what
            ``rewrite`` returned), exported as is.
        args, kwargs: example inputs; verification runs on them.
        path: the ``.onnx`` file to write.
        policy: the rewrite policy for a module; ``Dense``, ``Sparse(topk=0)``
            and ``Merge`` (modes ``"kv"``, ``"qkv"``, ``"tokens"``) sites have
            an ONNX form (``Sparse`` with ``topk > 0`` has none: ``ConfigError``).
        opset: ONNX opset in [18, 25], default 23. At >= 23 dense attention is
            one ``Attention`` node; below, MatMul/Softmax/MatMul.
        dynamic_seq: make the sequence axis dynamic (the rule of
            :mod:`attnrw.shapes`; a model that fixes the length raises
            :class:`~attnrw.errors.DynamicShapeError` naming the input). For a program, its own dynamic shapes
            are used and this only checks that it has some.
        verify: run the file in onnxruntime (CPU) on the example inputs and
            compare with the program in PyTorch; raise
            :class:`~attnrw.errors.VerificationError` beyond ``atol``
            (default 1e-4 for fp32, see ``verify.DEFAULT_ATOL``). For a
            module, a failing output's error is stated against a plain
            ``torch.onnx.export`` of the unmodified model's own error against
            eager on the same inputs, and accepted within
            ``verify.PLAIN_ERROR_FACTOR`` (4) times it: that much is the
            exporter's and onnxruntime's rounding, which attnrw shares.
        force: overwrite an existing file instead of raising
            :class:`~attnrw.errors.OutputExistsError`.
        dynamic_shapes: explicit ``torch.export`` dynamic shapes for a module
            (instead of ``dynamic_seq``).
        external_data: store weights in ``<path>.data``; ``None``: only past 2 GB.

    Raises:
        ExporterLimitError: the export, or onnxruntime loading or running the
            file, failed outside attnrw's translations, and a plain
            ``torch.onnx.export`` (``dynamo=True``, same opset) of the
            unmodified module fails too: the limit is the exporter's or
            onnxruntime's; the message names the op. When the plain export
            works, or the failing node is an attnrw translation's, the
            original error is raised with a note that it is attnrw's. The
            plain export is made only when something failed.

    Returns:
        The path written. Nothing is written if any step fails: the files are
        staged in a temporary folder beside ``path`` and moved into place last.
    """
    opset = check_opset(opset)
    path = check_output(path, force)
    args = tuple(args)
    if dynamic_seq and dynamic_shapes is not None:
        raise ConfigError("give either dynamic_seq=True or dynamic_shapes=, not both")

    if isinstance(model_or_program, torch.export.ExportedProgram):
        program = model_or_program
        if dynamic_shapes is not None:
            raise ConfigError("dynamic_shapes= applies to a module; a program keeps the shapes it was exported with")
        if policy != Dense():
            raise ConfigError("policy= applies to a module; a program is exported with the rewrites it already holds")
        if dynamic_seq and not _has_symbolic_inputs(program):
            raise ConfigError(
                "dynamic_seq=True but the program has only static input shapes; export it with "
                "dynamic_shapes (or pass the nn.Module to to_onnx with dynamic_seq=True)"
            )
    elif isinstance(model_or_program, torch.nn.Module):
        from attnrw.rewriter.api import rewrite  # lazily: the rewriter does not need onnx loaded first

        if dynamic_seq:
            dynamic_shapes = dynamic_seq_shapes(model_or_program, args, kwargs)
        with dynamic_seq_errors() if dynamic_seq else contextlib.nullcontext():
            program = rewrite(model_or_program, args, kwargs, policy=policy, dynamic_shapes=dynamic_shapes)
    else:
        raise TypeError(f"to_onnx takes an nn.Module or an ExportedProgram, got {type(model_or_program).__name__}")

    module = model_or_program if isinstance(model_or_program, torch.nn.Module) else None

    def failed(e: Exception, stage: str, staged: Path | None = None) -> BaseException:
        # Only on failure: a plain export of the unmodified model tells attnrw's failures from the exporter's.
        with tempfile.TemporaryDirectory(prefix="attnrw-plain-") as tmp:
            return diagnose(e, stage, module, args, kwargs, opset, dynamic_shapes, Path(tmp), staged)

    try:
        onnx_program = export_program(program, args, kwargs, opset)
    except AttnrwError:
        raise
    except Exception as e:
        err = failed(e, "export")
        if err is e:
            raise
        raise err from e

    def baseline() -> list[Any] | str:
        if module is None:
            return "no plain export to compare with: to_onnx was given a program, not the unmodified model"
        with tempfile.TemporaryDirectory(prefix="attnrw-plain-") as tmp:
            return baseline_comparisons(module, args, kwargs, opset, dynamic_shapes, Path(tmp), atol)

    def write(folder: Path) -> None:
        staged = folder / path.name
        onnx_program.save(staged, external_data=external_data)
        if not verify:
            return
        try:
            verify_file(staged, program, args, kwargs, atol, baseline=baseline)
        except AttnrwError:
            raise
        except Exception as e:  # onnxruntime could not load or run the file
            err = failed(e, stage_of_runtime_error(e), staged)
            if err is e:
                raise
            raise err from e

    write_atomically(path, write, force)
    logger.info("wrote %s (opset %d)", path, opset)
    return path
