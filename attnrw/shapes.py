"""The dynamic-sequence rule: which input axes ``dynamic_seq`` (CLI ``--dynamic-seq``) makes dynamic.

One rule serves ``attnrw rewrite --dynamic-seq``, ``attnrw export
--dynamic-seq`` and ``attnrw.export.to_onnx(dynamic_seq=True)``:

* the sequence length ``S`` is dim 1 of the first tensor of rank >= 2 among
  the inputs, in the order of ``forward``'s parameters (nested containers
  flattened in order); ``S`` must be >= 2, since ``torch.export`` specialises
  sizes 0 and 1;
* every tensor input of rank >= 2 whose dim 1 is ``S`` gets dim 1 marked,
  and a square ``(S, S)`` 2-D tensor (an attention mask) gets both axes
  marked. This covers ``input_ids``, ``attention_mask``, ``token_type_ids``,
  ``position_ids`` (B, S), hidden states (B, S, E) and (S, S) masks, and
  leaves e.g. images (B, 3, H, W) static;
* the marks are ``Dim.DYNAMIC``: a model that cannot take other lengths
  (a fixed position table, a reshape to a constant) fails to export, and
  :func:`dynamic_seq_errors` turns that failure into a
  :class:`~attnrw.errors.DynamicShapeError` naming the input, rather than
  returning a program silently specialised to the example length.

Pick an example length that no other input has at dim 1 (not 3 beside
images of 3 channels); give ``dynamic_shapes=`` explicitly for other layouts.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from attnrw.errors import ConfigError, DynamicShapeError

__all__ = ["dynamic_seq_errors", "dynamic_seq_shapes", "seq_length"]


def _forward(model: Any) -> Any:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module().forward
    return model.forward if isinstance(model, torch.nn.Module) else model


def _bound(model: Any, args: tuple, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``{forward's parameter name: value}`` of the example inputs, in parameter order."""
    forward = _forward(model)
    try:
        sig = inspect.signature(forward)
        return dict(sig.bind(*tuple(args), **(kwargs or {})).arguments)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"dynamic_seq: the example inputs do not fit the model's forward ({e}); "
            "pass inputs that forward accepts, or dynamic_shapes= explicitly"
        ) from None


def _matrices(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor) and x.dim() >= 2]


def seq_length(model: Any, args: tuple, kwargs: dict[str, Any] | None = None) -> int:
    """``S``: dim 1 of the first input tensor of rank >= 2; ``ConfigError`` if there is none or it is < 2."""
    leaves = _matrices(list(_bound(model, args, kwargs).values()))
    if not leaves:
        raise ConfigError(
            "dynamic_seq needs a tensor input of rank >= 2 whose dim 1 is the sequence; "
            "give dynamic_shapes= explicitly for this model"
        )
    seq = int(leaves[0].shape[1])
    if seq < 2:
        raise ConfigError(
            f"dynamic_seq needs example inputs with a sequence length >= 2 (got {seq}): "
            "torch.export specialises dimensions of size 0 and 1"
        )
    return seq


def dynamic_seq_shapes(model: Any, args: tuple, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``dynamic_shapes`` for ``torch.export`` under the rule above, keyed by ``forward``'s parameter names.

    ``model`` is an ``nn.Module``, an ``ExportedProgram`` (its module's
    forward) or a function. A parameter that takes ``*args`` or ``**kwargs``
    gets a tuple or dict of specs, as ``torch.export`` expects.
    """
    bound = _bound(model, args, kwargs)
    seq = seq_length(model, args, kwargs)
    dyn = torch.export.Dim.DYNAMIC

    def mark(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or int(x.shape[1]) != seq:
            return None
        if x.dim() == 2 and int(x.shape[0]) == seq:
            return {0: dyn, 1: dyn}
        return {1: dyn}

    return {name: pytree.tree_map(mark, value) for name, value in bound.items()}


_SPECIALISED = re.compile(
    r"You marked L\[(?P<source>.+?)\]\.size\(\)\[(?P<axis>\d+)\] as dynamic but your code specialized it "
    r"to be a constant \((?P<size>\d+)\)"
)


def _input_name(source: str) -> str:
    """``input_ids`` from dynamo's source ``'input_ids'`` or ``'args'][0][1`` (the best it names)."""
    parts = re.findall(r"'([^']+)'|\[(\d+)\]", source)
    words = [name or f"[{index}]" for name, index in parts]
    return "".join(words) if words else source


@contextlib.contextmanager
def dynamic_seq_errors() -> Iterator[None]:
    """Turn ``torch.export``'s "marked dynamic but specialized" failure into a :class:`DynamicShapeError`.

    Wrap the ``torch.export`` call (or ``attnrw.rewrite``) that uses
    :func:`dynamic_seq_shapes`; other errors pass through unchanged.
    """
    try:
        yield
    except Exception as e:
        found = _SPECIALISED.findall(str(e)) if "Constraints violated" in str(e) else []
        if not found:
            raise
        inputs = ", ".join(f"{_input_name(src)} (dim {axis}, fixed to {size})" for src, axis, size in found)
        raise DynamicShapeError(
            f"the sequence length cannot vary in this model: it fixes {inputs}, e.g. through a position "
            "table or a reshape to a constant size. Export it without dynamic_seq (CLI: --dynamic-seq), "
            "or give dynamic_shapes= marking only the axes that can vary"
        ) from e
