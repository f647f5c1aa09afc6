"""Which op a policy turns a matched site into, and with what arguments."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch

from attnrw.policies import Condense, Dense, Merge, Policy, Sparse
from attnrw.errors import ConfigError
from attnrw.patterns.match import Match


@dataclass(frozen=True)
class Lowering:
    """The op to emit for a site (``op(q, k, v, mask, is_causal, scale, *extra)``) and a note for the report."""

    op: Any
    extra: tuple
    is_causal: bool
    policy: str
    note: str = ""
    tokens: bool = False  # a Merge(mode="tokens") site: the tokens pass may carry its merged tokens on

    @property
    def op_name(self) -> str:
        return str(self.op.name()).split("::")[-1].split(".")[0]


def _dense(m: Match, note: str = "", policy: str = "dense") -> Lowering:
    return Lowering(torch.ops.attnrw.attention.default, (), m.is_causal, policy, note)


def lower(m: Match, policy: Policy, index: int = 0) -> Lowering:
    """The lowering of one site (number ``index`` in graph order) under one policy.

    Lossy policies keep a site dense where they do not apply, and say why in the note.
    """
    if isinstance(policy, Dense):
        return _dense(m)
    site = m.site
    if isinstance(policy, (Sparse, Condense)) and not site.self_attention:
        why = "queries and keys are not one aligned sequence"
        if site.attended_axis == "features":
            why = "the scores attend over features (channel attention), not tokens"
        elif site.q_len != site.kv_len:
            why = f"query length {site.q_len} differs from key length {site.kv_len}"
        return _dense(m, f"{policy.name} not applicable ({why}); kept dense", policy.name)
    if isinstance(policy, Sparse):
        op = getattr(torch.ops.attnrw, "sparse_attention", None)
        if op is None:  # pragma: no cover - the kernel package registers it on import
            raise RuntimeError("torch.ops.attnrw.sparse_attention is not registered")
        extra = (policy.window, policy.sinks, policy.topk, policy.block_size, policy.impl)
        return Lowering(op.default, extra, site.causal, policy.name)
    if isinstance(policy, Condense):
        op = getattr(torch.ops.attnrw, "condensed_attention", None)
        if op is None:
            raise ConfigError("the condense policy is not implemented in this version of attnrw")
        extra = (policy.recent, policy.group, policy.sinks, policy.pooling, policy.size_bias, policy.block_size, policy.impl)
        return Lowering(op.default, extra, site.causal, policy.name)
    if isinstance(policy, Merge):
        return _lower_merge(m, policy, index)
    raise TypeError(f"no lowering for policy {policy!r}")


def _schedule_value(value: Any, name: str, site_path: str, index: int) -> Any:
    """One site's value of a Merge schedule (a number, a per-site list, or a dict of globs)."""
    if isinstance(value, tuple):
        if index >= len(value):
            raise ConfigError(
                f"Merge.{name} lists {len(value)} values but the graph has a site number {index + 1}; "
                "give one value per site in graph order"
            )
        return value[index]
    if isinstance(value, dict):
        for pattern, v in value.items():
            if fnmatch.fnmatchcase(site_path, pattern):
                return v
        return 0
    return value


def _lower_merge(m: Match, policy: Merge, index: int) -> Lowering:
    site = m.site
    if site.causal:
        return _dense(m, "merge not applicable (causal: merging keys would mix past and future); kept dense",
                      policy.name)
    op = getattr(torch.ops.attnrw, "merged_attention", None)
    if op is None:
        raise ConfigError("the merge policy is not implemented in this version of attnrw")
    mode, note, tokens = policy.mode, "", False
    if mode == "tokens":
        # Emitted as qkv (merge, attend, restore at the site); the tokens pass
        # (attnrw.rewriter.tokens) then carries the merged tokens on where it
        # can prove the layers after the site token-wise, and notes where not.
        mode, tokens = "qkv", site.self_attention
        if not tokens:
            note = "tokens mode needs one aligned sequence; merged keys/values only (kv)"
    if mode == "qkv" and not site.self_attention:
        mode = "kv"
        note = note or "qkv needs one aligned sequence; merged keys/values only (kv)"
    if policy.ratio is not None:
        ratio, r = float(_schedule_value(policy.ratio, "ratio", site.module_path, index)), -1
    else:
        ratio, r = 0.0, int(_schedule_value(policy.r, "r", site.module_path, index))
    extra = (ratio, r, mode, list(policy.protect), policy.impl)
    return Lowering(op.default, extra, False, policy.name, note, tokens)
