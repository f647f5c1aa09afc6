"""What a matcher returns: a frozen description of one attention site, or a reason it is not one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionSite:
    """One attention computation found in a graph.

    ``module_path`` is the innermost module the computation runs in (from the
    node's ``nn_module_stack``; ``""`` for the root). ``source`` names the
    idiom that wrote it: ``"sdpa"`` (any aten form of
    ``scaled_dot_product_attention``), ``"eager"`` (hand-written
    matmul/softmax/matmul) or ``"mha"`` (PyTorch's fused multi-head attention
    paths). ``num_heads``/``num_kv_heads`` are the query and key/value heads
    (equal unless grouped-query attention); a graph that folds heads into the
    batch axis reports ``num_heads=1`` with the folded batch. ``q_len`` and
    ``kv_len`` are example lengths (symbolic when traced with dynamic shapes,
    printed as their hint). ``mask`` is one of ``none``, ``causal``,
    ``causal+padding``, ``causal+bias``, ``padding``, ``bias``, ``bool``,
    ``additive``. ``self_attention`` is True when queries and keys are one
    aligned sequence, position for position: square scores that are causal
    (query i sees keys up to i), or query i and key i proven to be position
    i of one tensor through ops token-wise along the token axis (see
    :mod:`attnrw.patterns.tokens`).
    ``attended_axis`` says what the query and key axes of the scores are
    made of: ``"tokens"``, ``"features"`` (channel attention: the scores
    are channels × channels; never aligned) or ``"unknown"`` (the trail
    back to a projection was lost). ``index`` is the site's number in
    graph order among the sites of its graph (per-site schedules use it).
    ``softcap`` > 0: the scaled scores are capped to ``softcap · tanh(s /
    softcap)`` before the mask (Gemma 2's attention-logit softcapping); 0: not.
    """

    module_path: str
    source: str
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    scale: float
    causal: bool
    mask: str
    dropout_p: float
    dtype: str
    batch: int
    self_attention: bool
    node: str
    attended_axis: str = "tokens"
    index: int = 0
    softcap: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> tuple:
        """What identifies the site independently of the entry point that traced it."""
        return (
            self.module_path,
            self.num_heads,
            self.num_kv_heads,
            self.q_len,
            self.kv_len,
            self.head_dim,
            round(self.scale, 6),
            self.causal,
        )


@dataclass(frozen=True)
class Skipped:
    """A candidate (a softmax or an attention op) left as the model wrote it, and why."""

    module_path: str
    node: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
