"""``attnrw bench``: rewrite a model under a policy (calibrating Auto), then measure speed and error.

The table printed is the plan (per site: policy, site error, FLOPs saved),
then the end-to-end speed-up and output error against the unmodified model.
``--plot`` draws per-site error against FLOPs saved, and the model's speed
and error over a few budgets around the one asked for.
"""

from __future__ import annotations

import dataclasses
import argparse
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import attnrw
from attnrw.config import needs_calibration
from attnrw.policies import Policy
from attnrw.errors import ConfigError
from attnrw.files import CLI_HINT, check_output, write_atomically
from attnrw.metrics import float_leaves, relative_l2
from attnrw.rewriter.plan import Plan
from attnrw.rewriter.trace import export_program

log = logging.getLogger("attnrw.cli")


class ProgressBar:
    """A one-line text progress bar on stderr (only when stderr is a terminal, unless forced)."""

    def __init__(self, stream: Any = None, width: int = 30, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        frac = done / total if total else 1.0
        filled = int(self.width * frac)
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\n" if stage == "calibrate" and done >= total else ""
        self.stream.write(f"\r{stage:>9} [{bar}] {done}/{total}{end}")
        self.stream.flush()


# --- the error of a lossy rewrite, as every command prints it ---------------------------------


def is_lossy(policy: Policy | Plan) -> bool:
    """Whether a rewrite under ``policy`` may change the model's outputs (beyond rounding)."""
    if isinstance(policy, Plan):
        return any(not e.policy.exact for e in policy.entries)
    return not policy.exact


def pooled_cosine(out: list[torch.Tensor], ref: list[torch.Tensor], kwargs: dict[str, Any]) -> float | None:
    """Cosine of the mean-pooled token output (the first (batch, seq, features) float output), lowest over the batch.

    Tokens are averaged under the ``attention_mask`` input where there is one
    of shape (batch, seq), as a sentence embedding is; None when no output
    has that shape.
    """
    pair = next(((a, b) for a, b in zip(out, ref) if b.dim() == 3 and a.shape == b.shape), None)
    if pair is None:
        return None
    a, b = (t.detach().double() for t in pair)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(b.shape[:2]):
        weight = mask.to(b.dtype).unsqueeze(-1)
    else:
        weight = torch.ones_like(b[..., :1])
    pooled = [(t * weight).sum(1) / weight.sum(1).clamp_min(1) for t in (a, b)]
    return float(torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=-1).min())


def error_text(out: list[torch.Tensor], ref: list[torch.Tensor], kwargs: dict[str, Any]) -> str:
    """``relative L2 9.1e-01, cosine of the mean-pooled token output 0.83``: the output error of a rewrite."""
    text = f"relative L2 {relative_l2(out, ref):.2e}"
    cosine = pooled_cosine(out, ref, kwargs)
    if cosine is not None:
        text += f", cosine of the mean-pooled token output {cosine:.4f} (lowest in the batch)"
    return text


def float_outputs(model: Any, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The float outputs of a model or an ``ExportedProgram`` (run as its module) on the inputs, under no_grad."""
    run = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    with torch.no_grad():
        return float_leaves(run(*args, **kwargs))


def error_line(out: list[torch.Tensor], ref: list[torch.Tensor], kwargs: dict[str, Any], of: str = "") -> str:
    """The line ``rewrite`` and ``export`` print after a lossy rewrite (``of``: what was measured, if not the program)."""
    return f"error{of} against the unmodified model on the example inputs: {error_text(out, ref, kwargs)}"


@dataclass
class BenchResult:
    policy: str
    plan: Plan | None
    t_ref: float
    t_new: float
    rel_l2: float
    max_abs: float
    error: str = ""

    @property
    def speedup(self) -> float:
        return self.t_ref / self.t_new if self.t_new > 0 else math.inf


def _time(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    model: Any,
    args: tuple,
    kwargs: dict,
    policy: Policy | Plan,
    repeat: int,
    calib: list | None = None,
    check: list | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> BenchResult:
    """Rewrite under ``policy`` (calibrating Auto first) and compare with the unmodified model."""
    plan = None
    if needs_calibration(policy):
        plan = attnrw.calibrate(model, calib or [(args, kwargs)], check, policy=policy, progress=progress)
        policy = plan
    program = attnrw.rewrite(model, args, kwargs, policy=policy)
    rewritten = program.module()
    # The reference runs the same way (an exported, decomposed program), so the
    # speed-up is the rewrite's and not the difference between runners.
    reference = export_program(model, args, kwargs).module()
    with torch.no_grad():
        ref = float_leaves(reference(*args, **kwargs))
        out = float_leaves(rewritten(*args, **kwargs))
        t_ref = _time(lambda: reference(*args, **kwargs), repeat)
        t_new = _time(lambda: rewritten(*args, **kwargs), repeat)
    max_abs = max((float((a - b).abs().max()) for a, b in zip(out, ref)), default=0.0)
    name = "plan" if isinstance(policy, Plan) else policy.name
    return BenchResult(name, plan, t_ref, t_new, relative_l2(out, ref), max_abs, error_text(out, ref, kwargs))


def plot(path: Path, main: BenchResult, curve: list[tuple[float, BenchResult]]) -> None:
    """Per-site error vs FLOPs saved (left); the model's speed-up and error over budgets (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    if main.plan is not None:
        xs = [max(e.flops_saved, 1.0) for e in main.plan.entries]
        ys = [max(e.site_error, 1e-12) for e in main.plan.entries]
        ax1.scatter(xs, ys, c="tab:blue")
        for e, x, y in zip(main.plan.entries, xs, ys):
            ax1.annotate(e.site.split("#")[0].split(".")[-2] if "." in e.site else e.site, (x, y), fontsize=6)
        ax1.axhline(main.plan.budget, color="tab:red", linestyle="--", label=f"budget {main.plan.budget:g}")
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.legend()
    ax1.set_xlabel("FLOPs saved at the site")
    ax1.set_ylabel("site error vs dense (relative L2)")
    ax1.set_title("per site")
    if curve:
        budgets = [b for b, _ in curve]
        ax2.plot(budgets, [r.speedup for _, r in curve], "o-", color="tab:green", label="speed-up")
        ax2.set_xscale("log")
        ax2.set_xlabel("budget")
        ax2.set_ylabel("speed-up vs unmodified")
        ax3 = ax2.twinx()
        ax3.plot(budgets, [max(r.rel_l2, 1e-12) for _, r in curve], "s--", color="tab:orange", label="error")
        ax3.set_yscale("log")
        ax3.set_ylabel("model error (relative L2)")
    ax2.set_title("model")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_args(ns: argparse.Namespace) -> None:
    """What ``bench`` can check before the model is loaded beyond the command line: the output paths."""
    for path in (ns.plot, ns.plan_out):
        if path:
            check_output(path, ns.force, CLI_HINT)


def run(ns: argparse.Namespace, loaded: Any, policy: Policy | Plan) -> int:
    """The ``bench`` command once the model and policy are known (and :func:`check_args` has passed)."""
    calib = [(loaded.args, loaded.kwargs)]
    if ns.calib > 1:
        if loaded.fresh_inputs is None:
            raise ConfigError("--calib N > 1 needs a model that can draw inputs (hf:PATH); factories give one sample")
        calib += [loaded.fresh_inputs() for _ in range(ns.calib - 1)]
    check = [loaded.fresh_inputs()] if loaded.fresh_inputs is not None else None
    bar = ProgressBar()
    result = measure(loaded.model, loaded.args, loaded.kwargs, policy, ns.repeat, calib, check, bar)
    if result.plan is not None:
        print(result.plan)
    print(
        f"\nend to end, both as exported programs ({ns.repeat} runs, median): unmodified {result.t_ref * 1e3:.1f} ms, "
        f"rewritten {result.t_new * 1e3:.1f} ms, speed-up {result.speedup:.2f}x; "
        f"output error: {result.error}, max abs {result.max_abs:.2e}"
    )
    if ns.plan_out and result.plan is not None:
        target = result.plan.save(ns.plan_out, ns.force, CLI_HINT)
        print(f"wrote {target}")
    elif ns.plan_out:
        raise ConfigError("--plan-out needs --policy auto (there is no plan to save)")
    if ns.plot:
        curve: list[tuple[float, BenchResult]] = []
        if needs_calibration(policy):
            for factor in (0.1, 1.0, 10.0):
                auto = dataclasses.replace(policy, budget=policy.budget * factor)
                r = result if factor == 1.0 else measure(loaded.model, loaded.args, loaded.kwargs, auto,
                                                         ns.repeat, calib, check, bar)
                curve.append((auto.budget, r))
        else:
            curve.append((result.rel_l2 or 1e-12, result))
        target = write_atomically(ns.plot, lambda folder: plot(folder / Path(ns.plot).name, result, curve),
                                  ns.force, CLI_HINT)
        print(f"wrote {target}")
    return 0
