"""An op's backward op as its autograd formula: one registration for every attention op.

Each op ``attnrw::X(q, k, v, attn_mask, ...)`` has a backward op
``attnrw::X_backward(grad_out, q, k, v, attn_mask, ..., mask_grad) ->
(dq, dk, dv, dmask)`` (an op of its own: AOTAutograd, Inductor and
``torch.export`` see one opaque call, and autograd is off inside a custom
op's implementation anyway). The arguments between ``attn_mask`` and
``mask_grad`` are bound by name from the forward's schema, so a forward
argument the backward does not take (``impl``) is simply left out.
"""

from __future__ import annotations

from typing import Any

import torch

#: The leading and trailing arguments of every backward op; the ones between are the forward's, by name.
_BACKWARD_HEAD = ("grad_out", "q", "k", "v", "attn_mask")
_BACKWARD_TAIL = ("mask_grad",)


def _argument_names(op: Any) -> list[str]:
    return [a.name for a in op._opoverload._schema.arguments]


def register_backward(op: Any, backward_op: Any) -> None:
    """Register ``backward_op`` as the autograd formula of ``op``, and its fake (shape) implementation.

    ``op`` and ``backward_op`` are ``torch.library.custom_op`` objects.
    Only q, k, v and a float ``attn_mask`` get gradients; the mask's is
    asked for (``mask_grad``) only when autograd needs it.
    """
    fwd = _argument_names(op)
    bwd = _argument_names(backward_op)
    if tuple(bwd[: len(_BACKWARD_HEAD)]) != _BACKWARD_HEAD or tuple(bwd[-len(_BACKWARD_TAIL) :]) != _BACKWARD_TAIL:
        raise TypeError(f"{backward_op}: a backward op's schema is (grad_out, q, k, v, attn_mask, ..., mask_grad)")
    if tuple(fwd[:4]) != _BACKWARD_HEAD[1:]:
        raise TypeError(f"{op}: an attention op's schema starts with (q, k, v, attn_mask)")
    passed = [fwd.index(name) for name in bwd[len(_BACKWARD_HEAD) : -len(_BACKWARD_TAIL)]]
    no_grads = (None,) * (len(fwd) - 4)

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
    backward_op.register_fake(_backward_fake)


def _backward_fake(grad_out, q, k, v, attn_mask, *args):
    mask_grad = args[-1]
    dm = torch.empty_like(attn_mask) if (mask_grad and attn_mask is not None) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dm
