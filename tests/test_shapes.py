"""``attnrw.shapes``: the one dynamic-sequence rule of ``rewrite --dynamic-seq``, ``export --dynamic-seq`` and ``to_onnx``."""

from __future__ import annotations

import pytest
import torch

from attnrw.errors import ConfigError, DynamicShapeError
from attnrw.shapes import dynamic_seq_errors, dynamic_seq_shapes, seq_length

DYN = torch.export.Dim.DYNAMIC


class _Encoder(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, pixel_values=None, causal_mask=None, scale=1.0):
        return input_ids


class _Positions(torch.nn.Module):
    """Adds a fixed (7, 4) position table: the length cannot vary."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = torch.nn.Parameter(torch.zeros(7, 4))

    def forward(self, input_ids, attention_mask):
        return input_ids.unsqueeze(-1) + self.pos + attention_mask.unsqueeze(-1)


class _Varargs(torch.nn.Module):
    def forward(self, *tensors, **named):
        return tensors[0]


def test_rule_marks_the_sequence_axes_only() -> None:
    """dim 1 of rank>=2 inputs of length S, both axes of an (S, S) mask; images, scalars and 1-D left alone."""
    ids = torch.zeros(2, 7, dtype=torch.long)
    shapes = dynamic_seq_shapes(
        _Encoder(),
        (ids,),
        {"pixel_values": torch.zeros(2, 3, 8, 8), "attention_mask": torch.ones(2, 7), "causal_mask": torch.ones(7, 7)},
    )
    # keyed by forward's parameters, in their order, whatever order the kwargs came in
    assert list(shapes) == ["input_ids", "attention_mask", "pixel_values", "causal_mask"]
    assert shapes == {
        "input_ids": {1: DYN},
        "attention_mask": {1: DYN},
        "pixel_values": None,
        "causal_mask": {0: DYN, 1: DYN},
    }
    assert seq_length(_Encoder(), (ids,)) == 7


def test_length_comes_from_the_first_parameter_not_the_first_kwarg() -> None:
    hidden = torch.zeros(2, 5, 4)
    mask = torch.ones(2, 9)
    shapes = dynamic_seq_shapes(_Encoder(), (), {"attention_mask": mask, "input_ids": hidden})
    assert shapes["input_ids"] == {1: DYN} and shapes["attention_mask"] is None


def test_varargs_and_varkw() -> None:
    a, b = torch.zeros(2, 6, 3), torch.zeros(2, 4)
    shapes = dynamic_seq_shapes(_Varargs(), (a, b), {"mask": torch.ones(6, 6)})
    assert shapes == {"tensors": ({1: DYN}, None), "named": {"mask": {0: DYN, 1: DYN}}}


def test_bad_examples_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=">= 2"):
        dynamic_seq_shapes(_Encoder(), (torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)))
    with pytest.raises(ConfigError, match="rank >= 2"):
        dynamic_seq_shapes(_Encoder(), (torch.zeros(7), torch.ones(7)))
    with pytest.raises(ConfigError, match="do not fit the model's forward"):
        dynamic_seq_shapes(_Encoder(), (torch.zeros(2, 7),), {"no_such_input": torch.zeros(2, 7)})


def test_program_exported_with_the_rule_runs_at_other_lengths() -> None:
    model = _Encoder()
    ids, mask = torch.zeros(2, 7), torch.ones(2, 7)
    program = torch.export.export(model, (ids,), {"attention_mask": mask},
                                  dynamic_shapes=dynamic_seq_shapes(model, (ids,), {"attention_mask": mask}))
    other = torch.arange(22.0).reshape(2, 11)
    assert torch.equal(program.module()(other, attention_mask=torch.ones(2, 11)), other)


def test_a_model_that_fixes_the_length_names_its_inputs() -> None:
    model = _Positions()
    ids, mask = torch.zeros(2, 7), torch.ones(2, 7)
    with pytest.raises(DynamicShapeError, match=r"input_ids \(dim 1, fixed to 7\)") as info:
        with dynamic_seq_errors():
            torch.export.export(model, (ids, mask), dynamic_shapes=dynamic_seq_shapes(model, (ids, mask)))
    assert "attention_mask (dim 1, fixed to 7)" in str(info.value)


def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError):
        with dynamic_seq_errors():
            raise KeyError("unrelated")
