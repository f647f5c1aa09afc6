"""Calibration for the Auto policy: measure every candidate at every site, pick per site, check the model.

1. Run the calibration inputs once through the graph with every site
   instrumented: the canonical q, k, v and mask of each site come out as
   extra outputs.
2. For each site and candidate, run the candidate's op on those tensors and
   measure its relative L2 error against dense attention; estimate the
   attention FLOPs it saves.
3. Start from the cheapest *uniform* candidate whose model-level error (the
   model output's relative L2 error on the check inputs) is within the
   budget, so a plan never costs more than the best uniform policy.
4. Then, site by site (smallest site error first), move each site down to
   the cheapest candidate that keeps the model within the budget.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from attnrw.policies import Auto, Dense, Policy, dense_flops
from attnrw.policies.dense import is_dense
from attnrw.metrics import relative_l2_of, squared_errors
from attnrw.patterns.context import MatchContext
from attnrw.patterns.find import find_sites
from attnrw.patterns.match import Match
from attnrw.patterns.site import AttentionSite
from attnrw.rewriter.emit import Emitter
from attnrw.rewriter.lowering import call_site, lower_site
from attnrw.rewriter.plan import Plan, PlanEntry, site_keys

log = logging.getLogger("attnrw.calibrate")

Progress = Callable[[str, int, int], None]


def attention_flops(site: AttentionSite, policy: Policy) -> float:
    """Multiply-add FLOPs of the two attention products of one site under a policy (per call)."""
    return dense_flops(site) * policy.cost(site)


@dataclass
class _Stat:
    err2: float = 0.0
    ref2: float = 0.0

    @property
    def rel(self) -> float:
        return relative_l2_of(self.err2, self.ref2)


def _site_tensors(gm: GraphModule, matches: list[Match], inputs: Sequence[Any]) -> list[tuple]:
    """Run ``gm`` once with each site's canonical (q, k, v, mask) added to its outputs."""
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    original = out_node.args
    emitter = Emitter(gm)
    extra = []
    with graph.inserting_before(out_node):
        for m in matches:
            mask = emitter.emit(m.mask) if m.mask is not None else None
            extra.append((emitter.emit(m.q), emitter.emit(m.k), emitter.emit(m.v), mask))
    flat = [t for group in extra for t in group if t is not None]
    out_node.args = ((original[0], *flat),)
    gm.recompile()
    try:
        with torch.no_grad():
            result = gm(*inputs)
    finally:
        out_node.args = original
        graph.eliminate_dead_code()
        gm.recompile()
    values = iter(result[1:])
    return [tuple(next(values) if t is not None else None for t in group) for group in extra]


class Calibrator:
    """Calibrates one graph (an export program's or a compiled graph) under an Auto policy.

    ``ctx_for(gm)`` builds the match context of a graph module (a copy of the
    calibrated one when checking a plan); inputs are the graph's flat inputs.
    """

    def __init__(
        self,
        gm: GraphModule,
        ctx_for: Callable[[GraphModule], MatchContext],
        auto: Auto,
        progress: Progress | None = None,
    ) -> None:
        self.gm = gm
        self.ctx_for = ctx_for
        self.auto = auto
        self.progress = progress or (lambda stage, done, total: None)
        self.matches, _ = find_sites(gm, ctx_for(gm))
        self.keys = site_keys([m.site for m in self.matches])
        cands = tuple(c for c in auto.ladder() if not is_dense(c)) + (Dense(),)
        self.candidates = cands
        self._checks = 0

    def run(self, calib: Sequence[Sequence[Any]], check: Sequence[Sequence[Any]] | None = None) -> Plan:
        """Calibrate: site errors on ``calib``, then a search on the model error over ``check``."""
        check = check or calib
        errors = self._measure(calib)
        n = len(self.matches)
        dense = Dense()
        cheaper = {i: self._saving(i) for i in range(n)}

        # 1. The cheapest uniform policy within the budget is the starting point,
        #    so the plan never costs more than the best uniform choice.
        best = [dense] * n
        uniform = sorted(
            (c for c in self.candidates if not is_dense(c)),
            key=lambda c: sum(attention_flops(m.site, c) for m in self.matches),
        )
        best_error = self._check(best, check)
        for c in uniform:
            trial = [c if c in cheaper[i] else dense for i in range(n)]
            err = self._check(trial, check)
            if err <= self.auto.budget:
                best, best_error = trial, err
                break
        # 2. Then each site, most robust first, moves down to the cheapest
        #    candidate that keeps the model within the budget.
        order = sorted(range(n), key=lambda i: min((errors[i][c] for c in cheaper[i]), default=math.inf))
        for i in order:
            current = attention_flops(self.matches[i].site, best[i])
            for c in cheaper[i]:
                if attention_flops(self.matches[i].site, c) >= current:
                    break
                trial = [*best[:i], c, *best[i + 1 :]]
                err = self._check(trial, check)
                if err <= self.auto.budget:
                    best, best_error = trial, err
                    break

        entries, notes = [], []
        for i, m in enumerate(self.matches):
            c = best[i]
            note = ""
            if is_dense(c):
                note = "no candidate keeps the model within the budget" if cheaper[i] else "no candidate saves work here"
                notes.append(f"{self.keys[i]}: {note}; kept Dense")
            saved = attention_flops(m.site, dense) - attention_flops(m.site, c)
            entries.append(PlanEntry(self.keys[i], c, errors[i][c], saved, note))
        plan = Plan(entries, self.auto.budget, best_error, notes)
        if plan.all_dense:
            plan.notes.append("all-Dense plan: no candidate met the budget at any site")
        return plan

    def _saving(self, i: int) -> list[Policy]:
        """The candidates that save work at site ``i``, cheapest first."""
        site = self.matches[i].site
        full = attention_flops(site, Dense())
        out = [c for c in self.candidates if not is_dense(c) and attention_flops(site, c) < full]
        return sorted(out, key=lambda c: attention_flops(site, c))

    # -- steps ------------------------------------------------------------
    def _measure(self, calib: Sequence[Sequence[Any]]) -> dict[int, dict[Policy, float]]:
        stats = {i: {c: _Stat() for c in self.candidates} for i in range(len(self.matches))}
        total = len(calib) * len(self.matches)
        done = 0
        for inputs in calib:
            tensors = _site_tensors(self.gm, self.matches, inputs)
            for i, (m, (q, k, v, mask)) in enumerate(zip(self.matches, tensors)):
                with torch.no_grad():
                    dense = torch.ops.attnrw.attention(q, k, v, mask, m.is_causal, m.scale, m.softcap)
                    for c in self.candidates:
                        out = dense if is_dense(c) else call_site(m, lower_site(m, c), q, k, v, mask)
                        st = stats[i][c]
                        e, r = squared_errors(out, dense)
                        st.err2 += e
                        st.ref2 += r
                done += 1
                self.progress("calibrate", done, total)
        return {i: {c: s.rel for c, s in per.items()} for i, per in stats.items()}

    def _check(self, policies: list[Policy], check: Sequence[Sequence[Any]]) -> float:
        """The model output's relative L2 error over ``check`` with ``policies`` applied."""
        from attnrw.rewriter.passes import run_passes

        plan = Plan([PlanEntry(k, p, 0.0, 0.0) for k, p in zip(self.keys, policies)], self.auto.budget)
        work = copy.deepcopy(self.gm)
        run_passes(work, plan, self.ctx_for(work), name="calibration check")
        err2 = ref2 = 0.0
        with torch.no_grad():
            for inputs in check:
                e, r = squared_errors(work(*inputs), self.gm(*inputs))
                err2 += e
                ref2 += r
        self._checks += 1
        self.progress("check", self._checks, self._checks)
        return relative_l2_of(err2, ref2)
