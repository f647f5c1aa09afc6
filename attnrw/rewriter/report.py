"""The report of one pass over a graph: sites found, candidates skipped, what was done to each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attnrw.patterns.site import AttentionSite, Skipped


@dataclass(frozen=True)
class Decision:
    """What the rewriter did with one site: the op it emitted (or none) and why."""

    node: str
    module_path: str
    policy: str
    op: str | None
    note: str = ""
    #: The site's attention FLOPs under the policy as a fraction of dense (``Policy.cost``); None if not rewritten.
    cost: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(node=self.node, module_path=self.module_path, policy=self.policy, op=self.op, note=self.note,
                    cost=self.cost)


@dataclass
class Report:
    """Attention sites found in one graph, candidates skipped (with reasons), and decisions.

    ``sites``: every attention computation found, in graph order.
    ``skipped``: candidates (a softmax, an attention op) that were not
    rewritten, each with the reason. ``decisions``: per rewritten site, the
    policy applied and any note (e.g. a sparse policy that fell back to dense
    on a cross-attention site). ``str(report)`` is a readable table.
    """

    sites: list[AttentionSite] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    graph: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "sites": [s.to_dict() for s in self.sites],
            "skipped": [s.to_dict() for s in self.skipped],
            "decisions": [d.to_dict() for d in self.decisions],
        }

    def summary(self) -> str:
        """One line: counts of sites, rewrites and skips.

        A rewrite decides every site it finds (a decision per site, if only
        "not selected"), so a report with sites and no decisions comes from a
        read-only search (:func:`attnrw.inspect`) and says so instead of
        counting rewrites.
        """
        name = f"{self.graph}: " if self.graph else ""
        if self.sites and not self.decisions:
            return f"{name}{len(self.sites)} attention site(s), {len(self.skipped)} candidate(s) skipped (read only)"
        rewritten = sum(1 for d in self.decisions if d.op is not None)
        ops: dict[str, int] = {}
        for d in self.decisions:
            if d.op is not None:
                ops[d.op] = ops.get(d.op, 0) + 1
        op_text = ", ".join(f"{n}×{op}" for op, n in sorted(ops.items())) or "no ops"
        return (
            f"{name}{len(self.sites)} attention site(s), {rewritten} rewritten ({op_text}), "
            f"{len(self.skipped)} candidate(s) skipped"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.sites:
            header = ("module", "source", "heads", "kv", "q_len", "kv_len", "dim", "scale", "causal", "mask", "dtype")
            rows = [
                (
                    s.module_path or "<root>",
                    s.source,
                    str(s.num_heads),
                    str(s.num_kv_heads),
                    str(s.q_len),
                    str(s.kv_len),
                    str(s.head_dim),
                    f"{s.scale:.4g}" + (f" cap {s.softcap:.4g}" if s.softcap else ""),
                    "yes" if s.causal else "no",
                    s.mask,
                    s.dtype,
                )
                for s in self.sites
            ]
            lines += ["", "Sites:", *_table(header, rows)]
        if self.decisions:
            rows = [(d.module_path or "<root>", d.policy, d.op or "-", "-" if d.cost is None else f"{d.cost:.3g}", d.note)
                    for d in self.decisions]
            lines += ["", "Rewrites:", *_table(("module", "policy", "op", "flops", "note"), rows)]
        if self.skipped:
            rows = [(s.module_path or "<root>", s.node, s.reason) for s in self.skipped]
            lines += ["", "Skipped:", *_table(("module", "node", "reason"), rows)]
        return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r).rstrip() for r in rows]
    return out
