"""The ``torch.compile`` backend: trace to aten, rewrite the attention, hand the graph on.

``torch.compile(model, backend="attnrw", options={...})`` reaches
:func:`entry_point_backend` through the ``torch_dynamo_backends`` entry
point; :func:`backend` builds one from a policy object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from attnrw.config import BackendSettings, PolicySpec, check_policy_spec, needs_calibration, parse_options
from attnrw.errors import ConfigError
from attnrw.patterns.graph import hint
from attnrw.rewriter.calibrate import Calibrator
from attnrw.rewriter.plan import Plan
from attnrw.rewriter.passes import run_passes
from attnrw.rewriter.report import Report
from attnrw.rewriter.trace import compile_context, trace_to_aten

log = logging.getLogger("attnrw")


class AttnrwBackend:
    """A ``torch.compile`` backend that rewrites attention sites under a policy spec.

    Each compiled graph logs a one-line summary to the ``attnrw`` logger and,
    when ``on_report`` is given, hands it the graph's :class:`Report`.
    """

    def __init__(
        self,
        policy: PolicySpec,
        on_report: Callable[[Report], None] | None = None,
        settings: BackendSettings = BackendSettings(),
    ) -> None:
        check_policy_spec(policy)
        if settings.plan is not None:
            policy = Plan.load(settings.plan)
        self.policy = policy
        self.on_report = on_report
        self.settings = settings
        self._graphs = 0
        self.plans: list[Plan] = []

    def __call__(
        self,
        gm: GraphModule,
        example_inputs: Sequence[Any],
        *,
        mode: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Callable[..., Any]:
        """Rewrite one dynamo graph and compile it.

        ``mode`` is what ``torch.compile(..., mode=...)`` passes on; it goes to
        Inductor (``"reduce-overhead"``: CUDA graphs, on CUDA tensors only).
        ``options`` belong to ``backend="attnrw"``; a backend object already
        holds its policy and settings.
        """
        if options:
            raise ConfigError(
                "options= goes with backend='attnrw'; a backend built by attnrw.backend(...) takes its "
                f"policy and settings there (got options {', '.join(map(repr, sorted(options)))})"
            )
        patches = _mode_patches(mode)
        self._graphs += 1
        agm = trace_to_aten(gm, example_inputs)
        ctx = compile_context(agm, gm, example_inputs)
        policy = self.policy
        if needs_calibration(policy):
            # Calibrate on this call's inputs (they are real tensors here).
            inputs = [hint(x) if isinstance(x, torch.SymInt) else x for x in example_inputs]
            policy = Calibrator(agm, ctx.for_copy, policy).run([inputs])
            self.plans.append(policy)
            log.info("attnrw: calibrated plan for graph %d\n%s", self._graphs, policy)
        report = run_passes(agm, policy, ctx, name=f"graph {self._graphs}")
        log.info("attnrw: %s", report.summary())
        if self.on_report is not None:
            self.on_report(report)
        if self.settings.inner == "eager":
            if patches:
                log.info("attnrw: mode=%r is ignored with inner='eager' (no Inductor runs)", mode)
            return agm
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        if patches.get("triton.cudagraphs") and not any(
            isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs
        ):
            log.info("attnrw: mode=%r asks for CUDA graphs; this graph's inputs are not on CUDA, so it runs without", mode)
        with inductor_config.patch(patches):
            return compile_fx(agm, list(example_inputs))


def _mode_patches(mode: str | None) -> dict[str, Any]:
    """Inductor's settings for a ``torch.compile`` mode; a mode it does not know is a ``ConfigError``."""
    if mode is None or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    try:
        return dict(list_mode_options(mode))
    except RuntimeError as e:
        raise ConfigError(f"torch.compile mode {mode!r}: {e}") from None


def backend(
    policy: PolicySpec | None = None,
    on_report: Callable[[Report], None] | None = None,
    *,
    inner: str = "inductor",
) -> AttnrwBackend:
    """A ``torch.compile`` backend rewriting attention under ``policy`` (default ``Dense()``).

    ``inner`` compiles the rewritten graph: ``"inductor"`` or ``"eager"``.
    """
    from attnrw.policies import Dense

    return AttnrwBackend(policy if policy is not None else Dense(), on_report, BackendSettings(inner=inner))


def entry_point_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """``backend="attnrw"``: ``options`` parsed into a policy (unknown keys are an error); ``mode`` goes to Inductor."""
    opts = dict(options or {})
    on_report = opts.pop("on_report", None)
    policy, settings = parse_options(opts)
    return AttnrwBackend(policy, on_report, settings)(gm, example_inputs, mode=mode)


__all__ = ["AttnrwBackend", "backend", "entry_point_backend"]
