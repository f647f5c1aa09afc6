"""A plan: the policy chosen for each site, with its measured error and cost; saved as JSON.

Sites are keyed by module path and, where one module holds several sites,
their order in the graph (``encoder.layer.0.attention.self#0``), which is the
same whether the model comes through ``torch.export`` or ``torch.compile``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attnrw.policies import Dense, Policy, policy_from_dict
from attnrw.errors import PlanError
from attnrw.patterns.match import Match
from attnrw.patterns.site import AttentionSite

PLAN_FORMAT = "attnrw.plan"
PLAN_VERSION = 1


def site_keys(sites: list[AttentionSite]) -> list[str]:
    """``module_path#ordinal`` for each site, the ordinal counting sites of one module in graph order."""
    seen: dict[str, int] = {}
    keys = []
    for s in sites:
        n = seen.get(s.module_path, 0)
        seen[s.module_path] = n + 1
        keys.append(f"{s.module_path}#{n}")
    return keys


@dataclass
class PlanEntry:
    """One site of a plan: the policy chosen and why (error against dense attention, FLOPs saved)."""

    site: str
    policy: Policy
    site_error: float
    flops_saved: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy"] = self.policy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanEntry:
        try:
            return cls(
                site=str(d["site"]),
                policy=policy_from_dict(d["policy"]),
                site_error=float(d["site_error"]),
                flops_saved=float(d["flops_saved"]),
                note=str(d.get("note", "")),
            )
        except KeyError as e:
            raise PlanError(f"plan entry is missing the field {e}") from None


@dataclass
class Plan:
    """Per-site policies chosen by calibration (see :class:`attnrw.Auto`).

    Use it as a policy: ``attnrw.rewrite(model, args, policy=plan)``,
    ``attnrw.backend(plan)``, or save it and pass the file as
    ``options={"plan": path}`` / ``attnrw rewrite --plan path``.
    """

    entries: list[PlanEntry]
    budget: float
    model_error: float | None = None
    notes: list[str] = field(default_factory=list)

    # -- applying ---------------------------------------------------------
    def policies_for(self, matches: list[Match]) -> list[Policy | None]:
        """The policy of each matched site; a plan that does not fit the graph is an error."""
        keys = site_keys([m.site for m in matches])
        by_key = {e.site: e.policy for e in self.entries}
        missing = [k for k in keys if k not in by_key]
        extra = [k for k in by_key if k not in keys]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"sites not in the plan: {', '.join(missing)}")
            if extra:
                parts.append(f"plan entries with no site in the model: {', '.join(extra)}")
            raise PlanError("the plan does not match this model (" + "; ".join(parts) + "); calibrate again")
        return [by_key[k] for k in keys]

    # -- persistence ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "budget": self.budget,
            "model_error": self.model_error,
            "notes": list(self.notes),
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError("not an attnrw plan (missing 'format': 'attnrw.plan')")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan format version {d.get('version')!r} is not supported (this attnrw reads {PLAN_VERSION})")
        return cls(
            entries=[PlanEntry.from_dict(e) for e in d.get("entries", [])],
            budget=float(d["budget"]),
            model_error=d.get("model_error"),
            notes=list(d.get("notes", [])),
        )

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the plan as JSON, atomically; an existing file needs ``force=True``."""
        path = Path(path)
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass force=True (CLI: --force) to overwrite it")
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    # -- reporting --------------------------------------------------------
    @property
    def all_dense(self) -> bool:
        return all(isinstance(e.policy, Dense) for e in self.entries)

    def __str__(self) -> str:
        from attnrw.rewriter.report import _table

        rows = [
            (e.site, _policy_text(e.policy), f"{e.site_error:.2e}", f"{e.flops_saved:.3g}", e.note)
            for e in self.entries
        ]
        head = f"Plan: budget {self.budget:g} (relative L2)"
        if self.model_error is not None:
            head += f", model error on the check inputs {self.model_error:.2e}"
        lines = [head, *_table(("site", "policy", "site error", "FLOP saved", "note"), rows)]
        lines += self.notes
        return "\n".join(lines)


def _policy_text(p: Policy) -> str:
    d = p.to_dict()
    name = d.pop("policy")
    d.pop("impl", None)
    args = ", ".join(f"{k}={v}" for k, v in d.items() if k != "block_size")
    return f"{name}({args})" if args else name
