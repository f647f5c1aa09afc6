"""``attnrw.metrics``: the relative L2 error shared by calibration and ONNX verification."""

from __future__ import annotations

import math

import pytest
import torch

from attnrw.metrics import float_leaves, relative_l2, relative_l2_of, squared_errors


def test_relative_l2_over_a_pytree_is_the_norm_of_all_float_tensors_together() -> None:
    g = torch.Generator().manual_seed(0)
    ref = {"hidden": torch.randn(2, 5, 4, generator=g), "pooled": (torch.randn(2, 4, generator=g), torch.arange(3))}
    out = {"hidden": ref["hidden"] + 0.1 * torch.randn(2, 5, 4, generator=g),
           "pooled": (ref["pooled"][0].half().float(), torch.arange(3) + 1)}
    flat_out = torch.cat([out["hidden"].flatten(), out["pooled"][0].flatten()]).double()
    flat_ref = torch.cat([ref["hidden"].flatten(), ref["pooled"][0].flatten()]).double()
    expected = float(torch.linalg.vector_norm(flat_out - flat_ref) / torch.linalg.vector_norm(flat_ref))
    assert relative_l2(out, ref) == pytest.approx(expected, rel=1e-12)
    err2, ref2 = squared_errors(out, ref)
    assert err2 == pytest.approx(float((flat_out - flat_ref).pow(2).sum()), rel=1e-12)
    assert ref2 == pytest.approx(float(flat_ref.pow(2).sum()), rel=1e-12)
    assert len(float_leaves(out)) == 2  # the integer tensor is not compared


def test_parts_sum_over_batches() -> None:
    """Calibration adds the parts of several batches, then takes one ratio."""
    a, b = torch.ones(4), torch.full((4,), 2.0)
    e1, r1 = squared_errors(a, b)
    e2, r2 = squared_errors(b, b)
    assert relative_l2_of(e1 + e2, r1 + r2) == pytest.approx(math.sqrt(4 / 32))


def test_edge_cases() -> None:
    zero = torch.zeros(3)
    assert relative_l2(zero, zero) == 0.0
    assert relative_l2(torch.ones(3), zero) == math.inf
    with pytest.raises(ValueError, match="1 float output"):
        relative_l2([torch.ones(3)], [torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match="shape"):
        relative_l2(torch.ones(3), torch.ones(4))
