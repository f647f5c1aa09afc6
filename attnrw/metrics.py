"""The one error measure of a rewrite: relative L2 of the outputs, ``||out - ref|| / ||ref||``.

It is taken over every floating-point tensor of an output pytree at once
(a model's ``last_hidden_state`` and ``pooler_output`` together), in float64.
Calibration sums the two squared norms over several batches before taking
the ratio, hence :func:`squared_errors` and :func:`relative_l2_of`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["float_leaves", "relative_l2", "relative_l2_of", "squared_errors"]


def float_leaves(tree: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a pytree, in flattening order."""
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def squared_errors(out: Any, ref: Any) -> tuple[float, float]:
    """``(sum |out - ref|², sum |ref|²)`` over the floating-point tensors of two pytrees of the same structure.

    Raises ``ValueError`` if they hold different numbers of float tensors or
    tensors of different shapes (a comparison of unrelated outputs).
    """
    outs, refs = float_leaves(out), float_leaves(ref)
    if len(outs) != len(refs):
        raise ValueError(f"cannot compare {len(outs)} float output tensor(s) with {len(refs)} reference tensor(s)")
    err2 = ref2 = 0.0
    for a, b in zip(outs, refs):
        if a.shape != b.shape:
            raise ValueError(f"cannot compare an output of shape {tuple(a.shape)} with a reference of shape {tuple(b.shape)}")
        b64 = b.detach().double()
        err2 += float((a.detach().double().to(b64.device) - b64).pow(2).sum())
        ref2 += float(b64.pow(2).sum())
    return err2, ref2


def relative_l2_of(err2: float, ref2: float) -> float:
    """``sqrt(err2 / ref2)``; 0 when both are 0, ``inf`` when only the reference is 0."""
    if ref2 > 0:
        return math.sqrt(err2 / ref2)
    return 0.0 if err2 == 0 else math.inf


def relative_l2(out: Any, ref: Any) -> float:
    """Relative L2 error of ``out`` against ``ref`` (tensors or pytrees of tensors)."""
    return relative_l2_of(*squared_errors(out, ref))
