"""The passes: find sites, plan a policy per site, replace each by one op, clean up.

Pass order (one list, here): ``find_sites`` -> ``plan`` -> ``replace`` -> ``carry_tokens``
(only for ``Merge(mode="tokens")`` sites) -> ``cleanup``.
Matchers never touch the graph; every site is found before anything is replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch.fx import GraphModule

from attnrw.config import PolicySpec, resolve_policy
from attnrw.policies import Auto, Policy
from attnrw.errors import ConfigError
from attnrw.patterns.context import MatchContext
from attnrw.patterns.find import find_sites
from attnrw.patterns.graph import ASSERTS
from attnrw.patterns.match import Match
from attnrw.patterns.site import Skipped
from attnrw.rewriter.emit import Emitter
from attnrw.rewriter.lower import lower
from attnrw.rewriter.report import Decision, Report
from attnrw.rewriter.tokens import TOKENS_META, carry_tokens

log = logging.getLogger("attnrw.rewriter")


def plan(matches: list[Match], spec: PolicySpec) -> list[Policy | None]:
    """The policy each site gets (``None``: leave it as written)."""
    return [resolve_policy(spec, m.site) for m in matches]


def replace(gm: GraphModule, matches: list[Match], policies: list[Policy | None]) -> list[Decision]:
    """Replace each planned site by one attnrw op; returns what was done per site."""
    emitter = Emitter(gm)
    decisions: list[Decision] = []
    for index, (m, policy) in enumerate(zip(matches, policies)):
        site = m.site
        if policy is None:
            decisions.append(Decision(site.node, site.module_path, "-", None, "not selected by the policy"))
            continue
        lo = lower(m, policy, index)
        with gm.graph.inserting_before(m.replace):
            q, k, v = emitter.emit(m.q), emitter.emit(m.k), emitter.emit(m.v)
            mask = emitter.emit(m.mask) if m.mask is not None else None
            emitter.result = emitter.call(lo.op, (q, k, v, mask, lo.is_causal, float(m.scale), *lo.extra))
            emitter.result.meta["attnrw_site"] = site.to_dict()
            if lo.tokens:
                emitter.result.meta[TOKENS_META] = True
            if "nn_module_stack" in m.replace.meta:
                emitter.result.meta["nn_module_stack"] = m.replace.meta["nn_module_stack"]
            out = emitter.restride(emitter.emit(m.output), m.replace)
            emitter.result = None
        m.replace.replace_all_uses_with(out)
        _drop_asserts(gm, m.interior)
        decisions.append(Decision(site.node, site.module_path, lo.policy, lo.op_name, lo.note))
    return decisions


def _drop_asserts(gm: GraphModule, interior: set) -> None:
    """Remove metadata assertions on values the rewrite made dead, so they do not keep them alive."""
    for node in list(interior):
        for user in list(node.users):
            if user.target in ASSERTS and not user.users:
                gm.graph.erase_node(user)


def _drop_dead_anchors(gm: GraphModule, matches: list[Match]) -> None:
    """Erase replaced attention ops that DCE keeps (SDPA counts as impure: it may draw dropout noise)."""
    live = set(gm.graph.nodes)
    for m in matches:
        node = m.anchor
        if node is None or node not in live:
            continue
        users = list(node.users)
        if all(not u.users and u.op == "call_function" for u in users):
            for u in users:
                gm.graph.erase_node(u)
            gm.graph.erase_node(node)


def cleanup(gm: GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def run_passes(
    gm: GraphModule,
    spec: PolicySpec | None,
    ctx: MatchContext | None = None,
    name: str = "",
    planner: Callable[[list[Match], PolicySpec], list[Policy | None]] = plan,
) -> Report:
    """Find, plan, replace and clean up in place. With ``spec=None`` only find (inspect)."""
    matches, skipped = find_sites(gm, ctx)
    report = Report(sites=[m.site for m in matches], skipped=list(skipped), graph=name)
    if spec is None:
        return report
    from attnrw.rewriter.plan import Plan

    if isinstance(spec, Auto):
        raise ConfigError("an Auto policy must be calibrated into a Plan before it is applied")
    policies = spec.policies_for(matches) if isinstance(spec, Plan) else planner(matches, spec)
    report.decisions = replace(gm, matches, policies)
    gm.graph.eliminate_dead_code()
    _drop_dead_anchors(gm, [m for m, p in zip(matches, policies) if p is not None])
    report.decisions = carry_tokens(gm, report.decisions)
    for d in report.decisions:
        if d.op is None:
            report.skipped.append(Skipped(d.module_path, d.node, d.note))
    cleanup(gm)
    log.debug("%s", report.summary())  # the entry point logs it once at INFO
    return report
