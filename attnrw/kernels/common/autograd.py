"""An op's backward op and its registration as the autograd formula: one pattern for every attention op.

Each op ``attnrw::X(q, k, v, attn_mask, ...)`` has a backward op
``attnrw::X_backward(grad_out, q, k, v, attn_mask, ..., mask_grad) ->
(dq, dk, dv, dmask)``: an op of its own, so that AOTAutograd, Inductor and
``torch.export`` see one opaque call (autograd is off inside a custom op's
implementation anyway). Its arguments between ``attn_mask`` and
``mask_grad`` are the forward's, in the forward's order and with the
forward's types, less ``impl``: the backward always runs the PyTorch
recomputation, whichever implementation ran the forward. The mask gradient
is an empty tensor when not asked for (``mask_grad`` false).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: Forward arguments the backward op does not take.
_FORWARD_ONLY = ("impl",)


def _arguments(op: Any) -> list[tuple[str, str]]:
    """(name, declaration as written in the schema) of each argument of a custom op."""
    schema = op._opoverload._schema
    text = str(schema)
    inner = text[text.index("(") + 1 : text.rindex(") ->")]
    decls = inner.split(", ") if inner else []
    decls = [d.split("=")[0] for d in decls]  # the backward op takes every argument, without defaults
    names = [a.name for a in schema.arguments]
    if len(decls) != len(names) or any(not d.endswith(" " + n) for d, n in zip(decls, names)):
        raise TypeError(f"cannot read the arguments of {schema}")
    return list(zip(names, decls))


def register_backward(op: Any, grads: Callable[..., tuple[torch.Tensor, ...]]) -> Any:
    """Define ``<op>_backward`` running ``grads`` and register it as ``op``'s autograd formula; returns it.

    ``op`` is a ``torch.library.custom_op`` whose schema starts with
    ``(q, k, v, attn_mask``; ``grads(grad_out, q, k, v, attn_mask, ...,
    mask_grad)`` takes the backward op's arguments (module docstring) and
    returns (dq, dk, dv, dmask). Only q, k, v and a float ``attn_mask`` get
    gradients; the mask's is asked for only when autograd needs it.
    """
    args = _arguments(op)
    if [name for name, _ in args[:4]] != ["q", "k", "v", "attn_mask"]:
        raise TypeError(f"{op._opoverload._schema}: an attention op's schema starts with (q, k, v, attn_mask)")
    passed = [i for i, (name, _) in enumerate(args) if i >= 4 and name not in _FORWARD_ONLY]
    decls = ", ".join(decl for _, decl in args if _ not in _FORWARD_ONLY)
    schema = f"(Tensor grad_out, {decls}, bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)"
    backward_op = torch.library.custom_op(f"{op._opoverload._schema.name}_backward", grads, mutates_args=(), schema=schema)
    backward_op.register_fake(_backward_fake)
    no_grads = (None,) * (len(args) - 4)

    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask = inputs[:4]
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.args = tuple(inputs[i] for i in passed)

    def backward(ctx, grad_out):
        q, k, v, attn_mask = ctx.saved_tensors
        mask_grad = bool(attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[3])
        dq, dk, dv, dm = backward_op(grad_out, q, k, v, attn_mask, *ctx.args, mask_grad)
        return (dq, dk, dv, dm if mask_grad else None) + no_grads

    op.register_autograd(backward, setup_context=setup_context)
    return backward_op


def _backward_fake(grad_out, q, k, v, attn_mask, *args):
    mask_grad = args[-1]
    dm = torch.empty_like(attn_mask) if (mask_grad and attn_mask is not None) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dm
