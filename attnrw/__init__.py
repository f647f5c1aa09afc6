"""attnrw: find the attention in unmodified PyTorch models and rewrite it.

Public API (see DESIGN.md):

* :func:`inspect` -- the attention sites of a model, and the candidates skipped with reasons;
* :func:`rewrite` -- an offline rewrite into a ``torch.export.ExportedProgram``;
* :func:`backend` -- a ``torch.compile`` backend (also ``backend="attnrw"`` with no import);
* :func:`calibrate` -- turn an :class:`Auto` policy into a per-site :class:`Plan` on sample inputs;
* the policies :class:`Dense`, :class:`Sparse`, :class:`Merge`, :class:`Condense`, :class:`Auto`,
  :class:`Bias`, and the contract a new one follows: :class:`Policy`, :func:`register_policy`,
  :class:`Lowering`, :class:`Keep`;
* :mod:`attnrw.export` -- ONNX export (``attnrw.export.to_onnx``), imported on first use.

``import attnrw`` imports neither triton nor onnx and starts no CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any

from attnrw import kernels as _kernels  # noqa: F401  (registers torch.ops.attnrw.*)
from attnrw.config import parse_options
from attnrw.policies import (
    Auto,
    Bias,
    Condense,
    Dense,
    Keep,
    Lowering,
    Merge,
    Policy,
    Sparse,
    policy_from_dict,
    register_policy,
)
from attnrw.errors import (
    AttnrwError,
    ConfigError,
    DynamicShapeError,
    ExporterLimitError,
    ImplementationUnavailableError,
    ModelSpecError,
    OutputExistsError,
    OutputFolderError,
    OutputIsFolderError,
    OutputPathError,
    PlanError,
    VerificationError,
)
from attnrw.patterns.site import AttentionSite, Skipped
from attnrw.rewriter.api import calibrate, inspect, rewrite
from attnrw.rewriter.backend import backend
from attnrw.rewriter.plan import Plan
from attnrw.rewriter.report import Report

__version__ = "0.1.0"

__all__ = [
    "AttentionSite",
    "AttnrwError",
    "Auto",
    "Bias",
    "Condense",
    "ConfigError",
    "Dense",
    "DynamicShapeError",
    "ExporterLimitError",
    "ImplementationUnavailableError",
    "Keep",
    "Lowering",
    "Merge",
    "ModelSpecError",
    "OutputExistsError",
    "OutputFolderError",
    "OutputIsFolderError",
    "OutputPathError",
    "Plan",
    "PlanError",
    "Policy",
    "Report",
    "Skipped",
    "Sparse",
    "VerificationError",
    "backend",
    "calibrate",
    "export",
    "inspect",
    "parse_options",
    "policy_from_dict",
    "register_policy",
    "rewrite",
]


def __getattr__(name: str) -> Any:
    # attnrw.export pulls in onnx/onnxscript: load it only when asked for.
    if name == "export":
        return importlib.import_module("attnrw.export")
    raise AttributeError(f"module 'attnrw' has no attribute {name!r}")
