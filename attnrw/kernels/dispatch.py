"""Choosing an op's implementation: ``impl="auto" | "torch" | "triton"``, one rule for every op.

``"torch"`` is the pure-PyTorch path; ``"triton"`` the Triton kernel,
imported only when asked for; ``"auto"`` Triton on CUDA tensors when triton
imports, PyTorch otherwise. An explicit ``"triton"`` that cannot run raises
:class:`~attnrw.errors.ImplementationUnavailableError` with the cause; it
never falls back.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from attnrw.errors import ImplementationUnavailableError
from attnrw.kernels.common.checks import check_choice

#: The implementations every op takes as ``impl``.
IMPLS = ("auto", "torch", "triton")

F = TypeVar("F", bound=Callable[..., Any])


def triton_blocker(device: torch.device, module: str, kernel: str) -> str | None:
    """Why the Triton ``kernel`` (in ``module``) cannot run on ``device`` here, or None when it can."""
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return (
            f"the Triton {kernel} kernel needs CUDA tensors (got {device.type}), or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported; use impl='torch' or impl='auto'"
        )
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable", reported with its cause
        return f"triton could not be imported ({type(e).__name__}: {e}); install triton or use impl='torch'"
    return None


def check_impl(impl: str, op: str) -> None:
    """``ValueError`` for an impl name that is none of ``IMPLS``."""
    check_choice(op, "impl", impl, IMPLS)


def choose(impl: str, device: torch.device, *, op: str, torch_fn: F, module: str, attr: str, kernel: str,
           lacks: str | None = None) -> F:
    """The function ``impl`` names for tensors on ``device``: ``torch_fn`` or ``module.attr``.

    ``lacks``: what this call needs that the Triton kernel does not do (e.g. "softcap the
    scores"): ``"auto"`` then takes ``torch_fn`` and an explicit ``"triton"`` is refused.
    """
    check_impl(impl, op)
    if lacks is not None and impl == "triton":
        raise ImplementationUnavailableError(
            f"{op}: the Triton kernel does not {lacks}; use impl='torch' or impl='auto'"
        )
    if impl == "torch" or lacks is not None:
        return torch_fn
    why = triton_blocker(device, module, kernel)
    if impl == "triton" and why is not None:
        raise ImplementationUnavailableError(why)
    if impl == "triton" or (device.type == "cuda" and why is None):
        return getattr(importlib.import_module(module), attr)
    return torch_fn
