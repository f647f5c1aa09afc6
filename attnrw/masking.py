"""The one masking threshold: an additive mask value at or below :data:`MASKED_BELOW` masks a score out.

``exp(-1e4)`` underflows to zero in every float dtype, so adding such a value
to a score (instead of replacing the score with ``-inf``) changes the softmax
only on rows where every key is masked. Hugging Face models fill masks with
``finfo.min`` or with -1e4 .. -1e9, all at or below it. The pattern matchers
use it to classify masks and fills; the ONNX translations use it to find
padding keys. (The kernels keep their own copy: they import nothing from the
rest of the package.)
"""

from __future__ import annotations

__all__ = ["MASKED_BELOW"]

#: An additive mask value at or below this masks the score out.
MASKED_BELOW = -1e4

