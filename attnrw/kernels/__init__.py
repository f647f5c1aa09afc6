"""Kernels: one package per op. Importing this registers every ``torch.ops.attnrw`` op.

Each package holds ``op.py`` (the custom-op registration), ``reference.py``
(pure PyTorch: the CPU path and the test oracle, possibly split by concern
into modules it imports) and, where there is one, ``triton.py`` (the GPU
path, imported only when used); host-side preparation both paths need is in
the package's ``layout.py`` (or ``plan.py``, ``summaries.py``). What two or
more packages share is in :mod:`attnrw.kernels.common`; dispatch between
implementations is :mod:`attnrw.kernels.dispatch`.

Import rules (``tests/kernels/test_layering.py``): a package imports only
``common``, ``dispatch`` and itself; no ``triton.py`` reaches its own
``reference.py``; kernels import no layer above them (masking, patterns,
rewriter, export) nor the root package. Kernels know nothing of graphs.
"""

from attnrw.kernels import attention  # noqa: F401
from attnrw.kernels import sparse  # noqa: F401
from attnrw.kernels import condense  # noqa: F401
from attnrw.kernels import merge  # noqa: F401
