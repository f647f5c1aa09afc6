"""``torch.ops.attnrw.attention``: exact dense attention (the Dense policy's op)."""

from attnrw.kernels.attention import op as _op  # noqa: F401  (registers the op)
from attnrw.kernels.attention.reference import dense_attention, math_attention

__all__ = ["dense_attention", "math_attention"]
