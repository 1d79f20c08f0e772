"""Deliberately wrong layers for the tests that prove a comparison can fail."""
from __future__ import annotations

import paddle

# How much too large the wrong backward's input gradient is.
GRAD_SCALE = 1 + 1e-3


class _ScaledGradReLU(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return paddle.nn.functional.relu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        return grad * (x > 0).astype(grad.dtype) * GRAD_SCALE


def wrong_backward_relu(x):
    """ReLU with the right forward and an input gradient `GRAD_SCALE` times too large."""
    return _ScaledGradReLU.apply(x)


class WrongBackwardReLU(paddle.nn.Layer):
    def forward(self, x):
        return wrong_backward_relu(x)
