"""``inspect`` and ``rewrite``: the offline entry points, over ``torch.export`` programs."""

from __future__ import annotations

import logging
from typing import Any

import torch

from attnrw.config import PolicySpec, check_policy_spec, needs_calibration
from attnrw.policies import Auto, Dense
from attnrw.errors import ConfigError
from attnrw.rewriter.passes import run_passes
from attnrw.rewriter.calibrate import Calibrator, Progress
from attnrw.rewriter.plan import Plan
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
    if needs_calibration(policy):
        # Calibrate on the example inputs themselves; attnrw.calibrate takes a held-out set.
        policy = _calibrate_program(ep, ctx, policy, [(tuple(args or ()), dict(kwargs or {}))], None, None)
    rep = run_passes(ep.graph_module, policy, ctx, name=type(model).__name__)
    sync_output_signature(ep)
    if report is not None:
        report.append(rep)
    log.info("%s", rep.summary())
    return ep


Sample = tuple  # (args,) or (args, kwargs)


def _samples(samples: Any, what: str) -> list[tuple[tuple, dict]]:
    if isinstance(samples, tuple) and len(samples) in (1, 2) and isinstance(samples[0], (tuple, list)):
        samples = [samples]
    out = []
    for s in samples:
        if not isinstance(s, (tuple, list)) or len(s) not in (1, 2) or not isinstance(s[0], (tuple, list)):
            raise ConfigError(f"each {what} sample must be (args,) or (args, kwargs), got {type(s).__name__}")
        out.append((tuple(s[0]), dict(s[1]) if len(s) == 2 and s[1] is not None else {}))
    if not out:
        raise ConfigError(f"{what} needs at least one sample")
    return out


def _calibrate_program(
    ep: torch.export.ExportedProgram,
    ctx: Any,
    auto: Auto,
    calib: list[tuple[tuple, dict]],
    check: list[tuple[tuple, dict]] | None,
    progress: Progress | None,
) -> Plan:
    def flat(samples: list[tuple[tuple, dict]]) -> list[list[Any]]:
        return [list(ep._graph_module_flat_inputs(a, k)) for a, k in samples]

    calibrator = Calibrator(ep.graph_module, ctx.for_copy, auto, progress)
    return calibrator.run(flat(calib), flat(check) if check else None)


def calibrate(
    model: Any,
    calib: Any,
    check: Any = None,
    policy: Auto | None = None,
    dynamic_shapes: Any = None,
    progress: Progress | None = None,
) -> Plan:
    """Calibrate an :class:`~attnrw.Auto` policy into a :class:`~attnrw.rewriter.plan.Plan`.

    ``calib`` and ``check`` are samples ``(args, kwargs)`` (one, or a list of
    them, all of the shapes the model is exported with unless
    ``dynamic_shapes`` says otherwise). Site errors are measured on
    ``calib``; the model-level error is checked on ``check`` (default:
    ``calib``). ``progress(stage, done, total)`` is called as work proceeds.
    """
    auto = policy if policy is not None else Auto(budget=0.01)
    if not needs_calibration(auto):
        raise ConfigError(f"calibrate takes an Auto policy, got {type(auto).__name__}")
    calib_s = _samples(calib, "calib")
    check_s = _samples(check, "check") if check is not None else None
    args, kwargs = calib_s[0]
    _check_model(model, args, kwargs)
    ep = export_program(model, args, kwargs, dynamic_shapes)
    ctx = export_context(ep, args, kwargs)
    return _calibrate_program(ep, ctx, auto, calib_s, check_s, progress)
