"""``Bias``: add ``fn(b, h, q_idx, kv_idx)`` to a site's attention scores before softmax (exact).

An inference-time edit of attention on an unmodified model: steer which
tokens a layer attends to (boost a span, penalise another), the way
FlexAttention's ``score_mod`` edits scores in code written for it, here on
any model the matcher reads. ``fn`` takes four broadcasting int64 index
tensors -- batch (B,1,1,1), query head (1,H,1,1), query position
(1,1,Sq,1), key position (1,1,1,Sk) -- and returns a tensor that
broadcasts to (B, H, Sq, Sk). It must be written from their values and
Python numbers only: the rewriter traces it once and inlines its ops, so
it applies at every length a graph admits (a function that reads sizes or
holds tensor constants is refused with the reason).

The result is exact: the site computes ``softmax(scale·QKᵀ + mask + fn)·V``
with the site's own masks (causal, padding) still applied; the bias is
added where they are not ``-inf``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from attnrw.errors import ConfigError
from attnrw.imports import CALLABLE_SPEC, callable_spec, import_callable
from attnrw.policies.base import Lowering, Policy, check_positions, register_policy

if TYPE_CHECKING:
    from attnrw.patterns.site import AttentionSite

ScoreFn = Callable[[Any, Any, Any, Any], Any]


@register_policy
@dataclass(frozen=True)
class Bias(Policy):
    """Add ``fn(b, h, q_idx, kv_idx)`` to the attention scores before softmax (on ``heads`` only, if given)."""

    fn: ScoreFn
    """Score bias fn(b, h, q_idx, kv_idx) over broadcasting index tensors (pkg.mod:fn on the CLI)."""
    heads: tuple[int, ...] | None = None
    """Query heads the bias applies to (default: all)."""

    name: ClassVar[str] = "bias"

    def __post_init__(self) -> None:
        if isinstance(self.fn, str):  # a plan file or a dict names it as pkg.mod:fn
            if not CALLABLE_SPEC.match(self.fn):
                raise ConfigError(f"Bias.fn must be a function or a 'pkg.module:fn' string, got {self.fn!r}")
            object.__setattr__(self, "fn", import_callable(self.fn, context="Bias.fn"))
        if not callable(self.fn):
            raise ConfigError(f"Bias.fn must be a function fn(b, h, q_idx, kv_idx) -> Tensor, got {self.fn!r}")
        if self.heads is not None:
            heads = check_positions("Bias", "heads", self.heads)
            if not heads:
                raise ConfigError("Bias.heads must list at least one head (or be None for all heads)")
            object.__setattr__(self, "heads", heads)

    @property
    def exact(self) -> bool:
        return True  # the rewrite computes exactly the biased attention it asks for

    def lower(self, site: AttentionSite) -> Lowering:
        return Lowering(torch.ops.attnrw.attention.default, {}, note=f"score bias {_name(self.fn)}",
                        score_bias=self.score_bias)

    def score_bias(self, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        """``fn``'s bias, kept to the selected heads (a sum of ``h == i`` terms, so it traces into the graph)."""
        bias = self.fn(b, h, q_idx, kv_idx)
        if self.heads is None:
            return bias
        selected = sum((h == i) for i in self.heads)
        return bias * selected

    def to_dict(self) -> dict[str, Any]:
        spec = callable_spec(self.fn)
        if spec is None:
            raise ConfigError(
                f"Bias.fn {_name(self.fn)} has no importable name (a lambda, a local or nested function); "
                "define it at module level so a plan can name it as pkg.mod:fn"
            )
        out = super().to_dict()
        out["fn"] = spec
        out["heads"] = list(self.heads) if self.heads is not None else None
        return out

    def __hash__(self) -> int:  # fn may be an unhashable callable object; hash by identity
        return hash((type(self), id(self.fn), self.heads))


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
