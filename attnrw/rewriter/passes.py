"""The one ordered list of passes every way in runs: find, plan, replace, drop, carry tokens, clean up.

``torch.compile`` (:mod:`attnrw.rewriter.backend`), :func:`attnrw.rewrite`,
:func:`attnrw.inspect` and calibration's checks (:mod:`attnrw.rewriter.calibrate`)
all call :func:`run_passes`, which runs :data:`PASSES` in order over one
:class:`PassContext`. Each pass is ``fn(gm, ctx) -> None``: it reads what
earlier passes put in the context and adds its own part. Matchers never
touch the graph: every site is found before anything is replaced.
:func:`describe_passes` prints the list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule, Node

from attnrw.config import PolicySpec, needs_calibration, resolve_policy
from attnrw.errors import ConfigError
from attnrw.patterns.context import MatchContext
from attnrw.patterns.find import find_sites
from attnrw.patterns.graph import ASSERTS
from attnrw.patterns.match import Match
from attnrw.patterns.site import Skipped
from attnrw.policies import Policy
from attnrw.rewriter.emit import Emitter
from attnrw.rewriter.lowering import POLICY_META, SITE_META, emit_site, lower_site
from attnrw.rewriter.report import Decision, Report
from attnrw.rewriter.tokens import carry_tokens

log = logging.getLogger("attnrw.rewriter")

Pass = Callable[[GraphModule, "PassContext"], None]


@dataclass
class PassContext:
    """What the passes share over one graph.

    ``spec`` is the policy spec (``None``: only find, as :func:`attnrw.inspect`
    does); ``match_ctx`` what the matchers know about the graph's inputs.
    The passes fill ``matches`` (every site, in graph order), ``policies``
    (one per site, ``None``: left as written), ``emitted`` (the node each
    rewritten site became) and ``report``.
    """

    spec: PolicySpec | None
    match_ctx: MatchContext | None = None
    name: str = ""
    matches: list[Match] = field(default_factory=list)
    policies: list[Policy | None] = field(default_factory=list)
    emitted: dict[int, Node] = field(default_factory=dict)
    report: Report = field(default_factory=Report)

    @property
    def rewriting(self) -> bool:
        return self.spec is not None


def find(gm: GraphModule, ctx: PassContext) -> None:
    """Match every attention site (read-only); candidates that do not match go to the report with the reason."""
    matches, skipped = find_sites(gm, ctx.match_ctx)
    ctx.matches = matches
    ctx.report = Report(sites=[m.site for m in matches], skipped=list(skipped), graph=ctx.name)


def plan(gm: GraphModule, ctx: PassContext) -> None:
    """Give each site its policy from the spec (a plan's entries, a glob dict, a callable or one policy)."""
    spec = ctx.spec
    if spec is None:
        return
    if needs_calibration(spec):
        raise ConfigError(
            f"a {spec.name} policy must be calibrated into a Plan before it is applied (attnrw.calibrate)"  # type: ignore[union-attr]
        )
    policies_for = getattr(spec, "policies_for", None)
    if callable(policies_for) and not isinstance(spec, Policy):
        ctx.policies = list(policies_for(ctx.matches))
    else:
        ctx.policies = [resolve_policy(spec, m.site) for m in ctx.matches]


def replace(gm: GraphModule, ctx: PassContext) -> None:
    """Replace each planned site by the op its policy lowers it to (or the dense op where it keeps the site)."""
    if not ctx.rewriting:
        return
    emitter = Emitter(gm)
    for i, (m, policy) in enumerate(zip(ctx.matches, ctx.policies)):
        site = m.site
        if policy is None:
            ctx.report.decisions.append(Decision(site.node, site.module_path, "-", None, "not selected by the policy"))
            continue
        call = lower_site(m, policy)
        with gm.graph.inserting_before(m.replace):
            node = emit_site(emitter, m, call)
            node.meta[SITE_META] = site.to_dict()
            node.meta[POLICY_META] = policy
            if "nn_module_stack" in m.replace.meta:
                node.meta["nn_module_stack"] = m.replace.meta["nn_module_stack"]
            emitter.result = node
            out = emitter.restride(emitter.emit(m.output), m.replace)
            emitter.result = None
        m.replace.replace_all_uses_with(out)
        _drop_asserts(gm, m.interior)
        ctx.emitted[i] = node
        cost = 1.0 if call.kept else float(policy.cost(site))
        ctx.report.decisions.append(Decision(site.node, site.module_path, policy.name, call.op_name, call.note, cost))


def drop_replaced(gm: GraphModule, ctx: PassContext) -> None:
    """Erase what the rewrite made dead, including replaced attention ops that DCE keeps.

    SDPA counts as impure for dead-code elimination (it may draw dropout noise).
    """
    if not ctx.rewriting:
        return
    gm.graph.eliminate_dead_code()
    live = set(gm.graph.nodes)
    for m, policy in zip(ctx.matches, ctx.policies):
        node = m.anchor
        if policy is None or node is None or node not in live:
            continue
        users = list(node.users)
        if all(not u.users and u.op == "call_function" for u in users):
            for u in users:
                gm.graph.erase_node(u)
            gm.graph.erase_node(node)


def carry(gm: GraphModule, ctx: PassContext) -> None:
    """``Merge(mode="tokens")``: carry merged tokens through the token-wise layers after each site."""
    if ctx.rewriting:
        ctx.report.decisions = carry_tokens(gm, ctx.report.decisions)


def cleanup(gm: GraphModule, ctx: PassContext) -> None:
    """Report sites left unrewritten as skipped; dead-code elimination, lint, recompile."""
    if not ctx.rewriting:
        return
    for d in ctx.report.decisions:
        if d.op is None:
            ctx.report.skipped.append(Skipped(d.module_path, d.node, d.note))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


#: The passes, in the order they run.
PASSES: tuple[Pass, ...] = (find, plan, replace, drop_replaced, carry, cleanup)


def run_passes(
    gm: GraphModule,
    spec: PolicySpec | None,
    match_ctx: MatchContext | None = None,
    name: str = "",
) -> Report:
    """Run :data:`PASSES` over ``gm`` in place and return the report. With ``spec=None`` only find (inspect)."""
    ctx = PassContext(spec, match_ctx, name)
    for p in PASSES:
        p(gm, ctx)
    log.debug("%s", ctx.report.summary())  # the entry point logs it once at INFO
    return ctx.report


def describe_passes() -> str:
    """The pass list as text: one numbered line per pass with the first line of its docstring."""
    lines = []
    for i, p in enumerate(PASSES, 1):
        doc = (p.__doc__ or "").strip().splitlines()
        lines.append(f"{i}. {p.__name__}: {doc[0] if doc else ''}")
    return "\n".join(lines)


def _drop_asserts(gm: GraphModule, interior: set[Any]) -> None:
    """Remove metadata assertions on values the rewrite made dead, so they do not keep them alive."""
    for node in list(interior):
        for user in list(node.users):
            if user.target in ASSERTS and not user.users:
                gm.graph.erase_node(user)


__all__ = ["PASSES", "PassContext", "describe_passes", "run_passes"]
