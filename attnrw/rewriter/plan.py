"""A plan: the policy chosen for each site, with its measured error and cost; saved as JSON.

Sites are keyed by module path and, where one module holds several sites,
their order in the graph (``encoder.layer.0.attention.self#0``), which is the
same whether the model comes through ``torch.export`` or ``torch.compile``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attnrw.policies import Policy, policy_from_dict
from attnrw.policies.dense import is_dense
from attnrw.errors import AttnrwError, PlanError
from attnrw.files import write_atomically
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
        """An entry from its JSON form; ``PlanError`` naming the field for anything malformed."""
        if not isinstance(d, dict):
            raise PlanError(f"a plan entry must be an object, got {_json_type(d)}; calibrate again")
        missing = [k for k in ("site", "policy", "site_error", "flops_saved") if k not in d]
        if missing:
            raise PlanError(f"plan entry {d.get('site', '?')!r} is missing the field(s) {', '.join(missing)}")
        site = _field(d, "site", str, "a plan entry")
        try:
            policy = policy_from_dict(d["policy"])
        except (AttnrwError, TypeError, ValueError, KeyError) as e:
            raise PlanError(f"plan entry {site!r}: bad policy {d['policy']!r}: {e}") from None
        where = f"plan entry {site!r}"
        return cls(
            site=site,
            policy=policy,
            site_error=_field(d, "site_error", float, where),
            flops_saved=_field(d, "flops_saved", float, where),
            note=_field(d, "note", str, where) if "note" in d else "",
        )


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _field(d: dict[str, Any], name: str, kind: type, where: str) -> Any:
    """``d[name]`` as ``kind`` (``str``, or ``float`` from a JSON number); ``PlanError`` naming ``where`` otherwise."""
    value = d[name]
    if kind is str and isinstance(value, str):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    want = "a string" if kind is str else "a number"
    raise PlanError(f"{where}: field {name!r} must be {want}, got {_json_type(value)} ({value!r}); calibrate again")


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
        entries, notes = d.get("entries", []), d.get("notes", [])
        if not isinstance(entries, list):
            raise PlanError(f"the plan's 'entries' must be an array, got {_json_type(entries)}")
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise PlanError("the plan's 'notes' must be an array of strings")
        if "budget" not in d:
            raise PlanError("the plan is missing the field 'budget'")
        model_error = d.get("model_error")
        return cls(
            entries=[PlanEntry.from_dict(e) for e in entries],
            budget=_field(d, "budget", float, "the plan"),
            model_error=None if model_error is None else _field(d, "model_error", float, "the plan"),
            notes=list(notes),
        )

    def save(self, path: str | os.PathLike, force: bool = False, hint: str | None = None) -> Path:
        """Write the plan as JSON, atomically; an existing file needs ``force=True``.

        Raises :class:`~attnrw.errors.OutputExistsError` (and the other
        :class:`~attnrw.errors.OutputPathError` kinds) for a path it cannot
        write; ``hint`` replaces "pass force=True" in its message (the CLI
        passes ``attnrw.files.CLI_HINT``).
        """
        text = json.dumps(self.to_dict(), indent=2)
        extra = {} if hint is None else {"hint": hint}
        return write_atomically(path, lambda folder: (folder / Path(path).name).write_text(text), force, **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {path} is not valid JSON: {e}") from None
        except UnicodeDecodeError:
            raise PlanError(f"plan file {path} is not a text file; give a plan saved by Plan.save") from None
        except OSError as e:
            raise PlanError(f"cannot read the plan file {path}: {e.strerror or e}") from None
        return cls.from_dict(data)

    # -- reporting --------------------------------------------------------
    @property
    def all_dense(self) -> bool:
        return all(is_dense(e.policy) for e in self.entries)

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
