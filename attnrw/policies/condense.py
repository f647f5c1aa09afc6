"""``Condense``: recent tokens exact, older tokens condensed into one summary per group."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from attnrw.policies.base import (
    DEFAULT_BLOCK_SIZE,
    IMPLS,
    Keep,
    Lowering,
    Policy,
    check_bool,
    check_choice,
    check_int,
    key_fraction,
    register_policy,
)
from attnrw.policies.sparse import band_keys, not_aligned

if TYPE_CHECKING:
    from attnrw.patterns.site import AttentionSite


@register_policy
@dataclass(frozen=True)
class Condense(Policy):
    """Recent tokens exact, older tokens condensed in groups of ``group``.

    Keys after the ``sinks`` are cut into groups of ``group`` starting at
    position ``sinks``. A query sees the sinks, every key of the groups its
    recent window touches, and one summary key/value for each other group it
    may see. ``pooling="mean"`` averages keys and values; ``"query"`` weights
    them by their softmax score against a probe query (the mean query of the
    query's block). With ``size_bias`` a summary carries ``log(size)``.

    ``sinks`` defaults to 4 for the reason :class:`~attnrw.Sparse` gives
    (StreamingLLM's attention sinks); on SmolLM2-135M at 2048 tokens
    ``Condense(recent=256, group=16)`` gave perplexity 21.4 against 19.7 dense.
    """

    recent: int
    """Recent keys each query sees exactly (a window, as in sparse)."""
    group: int
    """Older keys condensed into one summary key/value."""
    sinks: int = 4
    """First tokens every query also sees exactly (attention sinks, as in sparse)."""
    pooling: str = "mean"
    """How a group is summarised: mean, or query (weighted by a probe query's scores)."""
    size_bias: bool = False
    """Add log(group size) to a summary's score, so it weighs as the keys it stands for."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Block size of the chunked kernels."""
    impl: str = "auto"
    """Kernel: auto, torch or triton."""

    name: ClassVar[str] = "condense"

    def __post_init__(self) -> None:
        check_int("Condense", "recent", self.recent, 1)
        check_int("Condense", "group", self.group, 1)
        check_int("Condense", "sinks", self.sinks, 0)
        check_choice("Condense", "pooling", self.pooling, ("mean", "query"))
        check_bool("Condense", "size_bias", self.size_bias)
        check_int("Condense", "block_size", self.block_size, 1)
        check_choice("Condense", "impl", self.impl, IMPLS)

    def lower(self, site: AttentionSite) -> Lowering | Keep:
        keep = not_aligned(self.name, site)
        if keep is not None:
            return keep
        kwargs = dict(recent=self.recent, group=self.group, sinks=self.sinks, pooling=self.pooling,
                      size_bias=self.size_bias, block_size=self.block_size, impl=self.impl, is_causal=site.causal)
        return Lowering(torch.ops.attnrw.condensed_attention.default, kwargs)

    def cost(self, site: AttentionSite) -> float:
        if not site.self_attention:
            return 1.0
        summaries = math.ceil(site.kv_len / self.group) / (2 if site.causal else 1)
        return key_fraction(site, band_keys(self.recent, site.causal) + self.group + self.sinks + summaries)

    @classmethod
    def auto_candidates(cls) -> tuple[Policy, ...]:
        return (cls(recent=64, group=16, sinks=4), cls(recent=128, group=8, sinks=4))
