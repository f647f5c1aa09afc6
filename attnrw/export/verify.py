"""Run an exported ONNX file in onnxruntime and compare it with the PyTorch program."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from attnrw.errors import VerificationError
from attnrw.metrics import relative_l2

logger = logging.getLogger("attnrw.export")

#: On a verification failure attnrw's export is still accepted where its error
#: is at most this many times a plain ``torch.onnx.export`` of the unmodified
#: model's own error on the same output and inputs (:mod:`attnrw.export.plain`):
#: then the error is the exporter's and onnxruntime's rounding, which attnrw
#: shares, not a translation's. Two fp32 computations of one model that differ
#: only in summation order (the fused ``Attention`` kernel vs the exporter's
#: ops, another association in a reduction) have max errors within a small
#: factor of each other; 4 leaves room for that while a wrong translation (a
#: dropped bias, a misread mask) is off by orders of magnitude more (1.35 vs
#: ~1e-6 on DeBERTa's padded rows).
PLAIN_ERROR_FACTOR = 4.0

#: Default absolute tolerance by output dtype. fp32: the bound of the export
#: contract (kernels and onnxruntime differ by summation order only, ~1e-7
#: relative); half precisions round at ~1e-3 relative.
DEFAULT_ATOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class Comparison:
    """Errors of one output: max |onnx - torch|, that over max |torch| (the output's scale), and the relative L2.

    ``rel_l2`` is :func:`attnrw.metrics.relative_l2`, the measure of
    ``Auto``'s budget, so an export's error and a rewrite's read alike.
    """

    name: str
    max_abs: float
    max_rel: float
    atol: float
    rel_l2: float = 0.0

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol


def flat_user_inputs(program: torch.export.ExportedProgram, args: tuple, kwargs: dict | None) -> list[tuple[str, Any]]:
    """(placeholder name, value) of each tensor user input, in the program's input order.

    kwargs are put in the order the program was exported with, so the
    flattening matches the ONNX graph's inputs (which carry the placeholder
    names) whatever order the caller wrote them in.
    """
    from torch.export._tree_utils import reorder_kwargs

    in_spec = program.call_spec.in_spec
    kwargs = kwargs or {}
    if in_spec is not None and kwargs:
        kwargs = reorder_kwargs(kwargs, in_spec)
    flat = pytree.tree_leaves((tuple(args), kwargs))
    specs = [s for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    if len(flat) != len(specs):
        raise VerificationError(
            f"the example inputs flatten to {len(flat)} values but the program takes {len(specs)} user inputs; "
            "pass the same args/kwargs the program was exported with"
        )
    out = []
    for spec, value in zip(specs, flat):
        if isinstance(spec.arg, torch.export.graph_signature.TensorArgument):
            out.append((spec.arg.name, value))
    return out


def reference_outputs(program: torch.export.ExportedProgram, args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    """The program's outputs in PyTorch, flattened, tensors only (as the ONNX graph returns them)."""
    with torch.no_grad():
        out = program.module()(*args, **(kwargs or {}))
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def onnxruntime_outputs(path: Path, inputs: Sequence[tuple[str, Any]]) -> list[np.ndarray]:
    """Run ``path`` in onnxruntime's CPU provider on the named inputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    given = {name: value for name, value in inputs}
    missing = [n for n in names if n not in given]
    if missing:
        raise VerificationError(f"the ONNX graph takes inputs {missing} that the example inputs do not provide")
    feed = {n: _to_numpy(given[n]) for n in names}
    return session.run(None, feed)


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            raise VerificationError("bfloat16 inputs cannot be fed to onnxruntime from numpy; verify in float32")
        return t.numpy()
    return np.asarray(t)


def compare(expected: Sequence[torch.Tensor], actual: Sequence[np.ndarray], atol: float | None) -> list[Comparison]:
    """Compare outputs pairwise; NaNs must sit at the same places on both sides."""
    if len(expected) != len(actual):
        raise VerificationError(f"onnxruntime returned {len(actual)} outputs, PyTorch {len(expected)}")
    result = []
    for i, (e, a) in enumerate(zip(expected, actual)):
        ref = e.detach().cpu()
        got = torch.from_numpy(np.asarray(a))
        if tuple(ref.shape) != tuple(got.shape):
            raise VerificationError(f"output {i}: onnxruntime shape {tuple(got.shape)} != PyTorch shape {tuple(ref.shape)}")
        tol = atol if atol is not None else DEFAULT_ATOL.get(ref.dtype, 0.0)
        if not ref.is_floating_point():
            wrong = int((ref != got.to(ref.dtype)).sum())
            result.append(Comparison(f"output {i}", float(wrong), float(wrong), 0.0, math.inf if wrong else 0.0))
            continue
        ref64, got64 = ref.double(), got.double()
        nan_ref, nan_got = torch.isnan(ref64), torch.isnan(got64)
        if not torch.equal(nan_ref, nan_got):
            result.append(Comparison(f"output {i}", math.inf, math.inf, tol, math.inf))
            continue
        ref64, got64 = ref64.masked_fill(nan_ref, 0.0), got64.masked_fill(nan_ref, 0.0)
        diff = (ref64 - got64).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(ref64.abs().max()) if ref64.numel() else 0.0
        result.append(Comparison(f"output {i}", max_abs, max_abs / max(scale, 1e-30), tol, relative_l2(got64, ref64)))
    return result


def verify_file(
    path: Path,
    program: torch.export.ExportedProgram,
    args: tuple,
    kwargs: dict | None,
    atol: float | None = None,
    baseline: Callable[[], list[Comparison] | str] | None = None,
) -> list[Comparison]:
    """Run ``path`` in onnxruntime and the program in PyTorch on the same inputs.

    Raises :class:`~attnrw.errors.VerificationError` naming the max abs and
    max rel error of every output beyond tolerance (fp32 default 1e-4 abs).

    ``baseline`` is called only when some output is beyond tolerance: it
    returns a plain export's own errors against the eager model on the same
    inputs, one per output (or a sentence saying why there are none). Each
    failing output's error is then stated against the plain export's, and
    the file is accepted when every failing output is within
    :data:`PLAIN_ERROR_FACTOR` times the plain export's error on it (the
    error is the exporter's and onnxruntime's own, see there).
    """
    expected = reference_outputs(program, args, kwargs)
    actual = onnxruntime_outputs(path, flat_user_inputs(program, args, kwargs))
    results = compare(expected, actual, atol)
    for r in results:
        logger.info(
            "verify %s: max abs error %.3g, max rel error %.3g, relative L2 %.3g (atol %.3g)",
            r.name, r.max_abs, r.max_rel, r.rel_l2, r.atol,
        )
    bad = [i for i, r in enumerate(results) if not r.ok]
    if not bad:
        return results
    failing = {
        i: f"{results[i].name}: max abs error {results[i].max_abs:.3g} > atol {results[i].atol:.3g} "
           f"(max rel error {results[i].max_rel:.3g}, relative L2 {results[i].rel_l2:.3g})"
        for i in bad
    }
    plain = baseline() if baseline is not None else "no plain export to compare with: verify_file was given no baseline"
    tail = ""
    if isinstance(plain, str):
        tail = f" ({plain}, so there is no baseline to state the error against)"
    elif len(plain) != len(results):
        tail = f" (a plain export returns {len(plain)} outputs, attnrw's {len(results)}: no baseline)"
    else:
        for i in bad:
            failing[i] += (
                f"; a plain torch.onnx.export of the unmodified model is off by {plain[i].max_abs:.3g} here "
                f"({_ratio(results[i].max_abs, plain[i].max_abs)})"
            )
        if all(results[i].max_abs <= PLAIN_ERROR_FACTOR * plain[i].max_abs for i in bad):
            logger.warning(
                "verify: beyond atol but within %gx a plain export's own error, accepted: %s",
                PLAIN_ERROR_FACTOR, " | ".join(failing.values()),
            )
            return results
        tail = f" (accepted only within {PLAIN_ERROR_FACTOR:g}x the plain export's error)"
    raise VerificationError(
        f"the ONNX model does not match PyTorch in onnxruntime: {' | '.join(failing.values())}{tail}. "
        "No file was written. Report this with the model; to write the file anyway pass verify=False."
    )


def _ratio(ours: float, plain: float) -> str:
    if plain == 0:
        return "the plain export is exact"
    return f"{ours / plain:.3g}x that"
