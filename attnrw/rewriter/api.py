"""``inspect`` and ``rewrite``: the offline entry points, over ``torch.export`` programs."""

from __future__ import annotations

import logging
from typing import Any

import torch

from attnrw.config import Dense, PolicySpec, check_policy_spec
from attnrw.errors import ConfigError
from attnrw.rewriter.replace import run_passes
from attnrw.rewriter.report import Report
from attnrw.rewriter.trace import export_context, export_program, sync_output_signature

log = logging.getLogger("attnrw.rewriter")


def _check_model(model: Any, args: Any, kwargs: Any) -> None:
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise ConfigError(
            f"model must be an nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}"
        )
    if args is not None and not isinstance(args, (tuple, list)):
        raise ConfigError(f"args must be a tuple of example inputs, got {type(args).__name__}; wrap one input as (x,)")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"kwargs must be a dict, got {type(kwargs).__name__}")


def inspect(model: Any, args: tuple | None = None, kwargs: dict | None = None) -> Report:
    """Find the attention sites of a model (or program) without changing it.

    ``Report.sites`` lists every site found; ``Report.skipped`` every
    candidate not matched, with the reason. The model is traced with
    ``torch.export`` on the example inputs.
    """
    _check_model(model, args, kwargs)
    ep = export_program(model, tuple(args or ()), kwargs)
    ctx = export_context(ep, args, kwargs)
    return run_passes(ep.graph_module, None, ctx, name=type(model).__name__)


def rewrite(
    model: Any,
    args: tuple | None = None,
    kwargs: dict | None = None,
    policy: PolicySpec = Dense(),
    dynamic_shapes: Any = None,
    *,
    report: list[Report] | None = None,
) -> torch.export.ExportedProgram:
    """Rewrite every attention site into an attnrw op; returns a ``torch.export`` program.

    ``model`` is an ``nn.Module`` (exported on ``args``/``kwargs``, with
    ``dynamic_shapes`` passed to ``torch.export.export``) or an
    ``ExportedProgram``. ``policy`` is a policy, a dict of module-path globs
    or a callable (see :mod:`attnrw.config`). The program saves with
    ``torch.export.save`` and loads with ``torch.export.load`` once
    ``attnrw`` is imported. Pass a list as ``report`` to receive the
    :class:`Report`.
    """
    _check_model(model, args, kwargs)
    check_policy_spec(policy)
    if isinstance(model, torch.export.ExportedProgram) and dynamic_shapes is not None:
        raise ConfigError("dynamic_shapes applies when exporting a module; this program is already exported")
    ep = export_program(model, tuple(args or ()), kwargs, dynamic_shapes)
    ctx = export_context(ep, args, kwargs)
    rep = run_passes(ep.graph_module, policy, ctx, name=type(model).__name__)
    sync_output_signature(ep)
    if report is not None:
        report.append(rep)
    log.info("%s", rep.summary())
    return ep
