"""``Dense``: the exact rewrite, one fused attention call per site."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from attnrw.policies.base import Lowering, Policy, check_choice, register_policy

if TYPE_CHECKING:
    from attnrw.patterns.site import AttentionSite


@register_policy
@dataclass(frozen=True)
class Dense(Policy):
    """Exact rewrite: the site becomes one fused attention call (SDPA)."""

    impl: str = "auto"
    """auto or torch: PyTorch's SDPA (FlashAttention or cuDNN on a GPU where PyTorch has them)."""

    name: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        check_choice("Dense", "impl", self.impl, ("auto", "torch"))

    @property
    def exact(self) -> bool:
        return True

    def lower(self, site: AttentionSite) -> Lowering:
        return Lowering(torch.ops.attnrw.attention.default)


def is_dense(policy: object) -> bool:
    """Whether ``policy`` is the exact dense rewrite."""
    return isinstance(policy, Dense)
