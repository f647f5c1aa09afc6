"""``torch.ops.attnrw.merged_attention``: attention over merged tokens (ToMe / MaMe-MaRe / SAT).

``plan`` chooses which tokens merge (bipartite soft matching on the keys),
``reference`` is the pure-PyTorch path and the oracle, ``triton`` the GPU
kernel for the attention on the merged tokens (imported lazily, only when
that implementation is used), ``op`` the custom-op registration, ``tokens`` the ops of ``tokens`` mode
(merge at a site, carry the reduced tokens, restore).
"""

from attnrw.kernels.merge import op as _op  # noqa: F401  (registers the ops)
from attnrw.kernels.merge import tokens as _tokens  # noqa: F401  (registers the tokens-mode ops)
from attnrw.kernels.merge.plan import MergePlan, merge_plan
from attnrw.kernels.merge.reference import attention_with_plan, merged_attention_torch

__all__ = ["MergePlan", "attention_with_plan", "merge_plan", "merged_attention_torch"]
