"""``torch.ops.attnrw.condensed_attention``: sinks + exact recent groups + one summary per older group.

``reference`` is the pure-PyTorch path and the oracle, ``triton`` the GPU
kernel (imported lazily, only when that implementation is used), ``layout``
the geometry both share, ``op`` the custom-op registration.
"""

from attnrw.kernels.condense import op as _op  # noqa: F401  (registers the ops)
from attnrw.kernels.condense.reference import condensed_attention_torch

__all__ = ["condensed_attention_torch"]
