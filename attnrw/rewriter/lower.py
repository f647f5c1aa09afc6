"""Which op a policy turns a matched site into, and with what arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnrw.config import Condense, Dense, Merge, Policy, Sparse
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

    @property
    def op_name(self) -> str:
        return str(self.op.name()).split("::")[-1].split(".")[0]


def _dense(m: Match, note: str = "", policy: str = "dense") -> Lowering:
    return Lowering(torch.ops.attnrw.attention.default, (), m.is_causal, policy, note)


def lower(m: Match, policy: Policy) -> Lowering:
    """The lowering of one site under one policy; lossy policies fall back to dense where they do not apply."""
    if isinstance(policy, Dense):
        return _dense(m)
    site = m.site
    if isinstance(policy, (Sparse, Condense)) and not site.self_attention:
        why = "queries and keys are not one aligned sequence"
        if site.q_len != site.kv_len:
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
        raise ConfigError("the merge policy is not implemented in this version of attnrw")
    raise TypeError(f"no lowering for policy {policy!r}")
