"""``torch.ops.attnrw.condensed_attention``: sinks + exact recent groups + one summary per older group.

``reference`` is the pure-PyTorch path and the oracle (the rule is in its
docstring), computed by ``blocking`` (the blocking and its cached masks),
``parts`` (the window and condensed parts) and ``grads`` (the backward);
``triton`` is the GPU kernel (imported lazily, only when that implementation
is used); ``layout`` the geometry and ``summaries`` the pooling both paths
share; ``op`` the custom-op registration.
"""

from attnrw.kernels.condense import op as _op  # noqa: F401  (registers the ops)
from attnrw.kernels.condense.reference import condensed_attention_torch

__all__ = ["condensed_attention_torch"]
