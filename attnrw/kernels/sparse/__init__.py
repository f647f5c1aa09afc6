"""``torch.ops.attnrw.sparse_attention``: sinks + sliding window + block top-k attention.

``reference`` is the pure-PyTorch path and the oracle, ``triton`` the GPU
kernel (imported lazily, only when that implementation is used), ``layout``
the geometry both share, ``op`` the custom-op registration.
"""

from attnrw.kernels.sparse import op as _op  # noqa: F401  (registers the ops)
from attnrw.kernels.sparse.reference import sparse_attention_torch

__all__ = ["sparse_attention_torch"]
