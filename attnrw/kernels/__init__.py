"""Kernels: one package per op. Importing this registers every ``torch.ops.attnrw`` op.

Each package holds ``reference.py`` (pure PyTorch: the CPU path and the test
oracle) and, where there is one, ``triton.py`` (the GPU path, imported only
when used). Kernels know nothing of graphs.
"""

from attnrw.kernels import attention  # noqa: F401
from attnrw.kernels import sparse  # noqa: F401
from attnrw.kernels import condense  # noqa: F401
from attnrw.kernels import merge  # noqa: F401
