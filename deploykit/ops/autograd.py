"""Gradients for deploykit's torch custom ops.

A ``torch.library.custom_op`` is opaque to autograd (that is what keeps it one node for export), so each op
registers a backward. Every op here has a plain PyTorch forward made of differentiable ops, so the backward simply
recomputes that forward under autograd and differentiates it: exact gradients, one implementation to maintain.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def differentiate_by_recomputing(op, forward: Callable[..., torch.Tensor], tensor_count: int) -> None:
    """Register autograd for `op`, whose first `tensor_count` arguments are tensors and the rest attributes.

    Args:
        op: the ``torch.library.custom_op`` object.
        forward: its eager implementation, differentiable in every tensor argument.
        tensor_count: how many leading arguments are tensors (each gets a gradient).
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensor_count])
        ctx.attributes = inputs[tensor_count:]

    def backward(ctx, grad):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
            out = forward(*leaves, *ctx.attributes)
            grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
        return (*grads, *([None] * len(ctx.attributes)))

    op.register_autograd(backward, setup_context=setup_context)
