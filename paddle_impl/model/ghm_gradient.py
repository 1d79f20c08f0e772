"""The GHM losses' reduction and its gradient, written by hand.

A GHM loss is ``sum(weight * loss) / (tot + eps) * loss_weight`` (or the
element-wise products), where the weights depend on the prediction only
through detached quantities (`paddle_impl.model.ghm_loss`). Its gradient
with respect to the prediction is therefore ``weight * d loss / d pred``
times the reduction's factor: the loss computes that product anyway, and
`HarmonizedLoss` hands it to autograd instead of a graph of full-size
intermediates.
"""
from __future__ import annotations

import paddle
from paddle.autograd import PyLayer

__all__ = ["HarmonizedLoss", "reduce_weighted"]


class HarmonizedLoss(PyLayer):
    """The reduced (or element-wise) weighted loss, with its gradient.

    The forward pass receives what the two passes computed without autograd:
    ``value``, the sum of weight * loss (() in the computation dtype) or
    their product element-wise, and ``gradient``, weight * d loss / d pred
    shaped like ``pred``. The gradient with respect to ``pred`` is that times
    the reduction's factor, in ``pred``'s dtype: what autograd would give (the
    weights depend on ``pred`` only through detached quantities) without a
    graph of full-size intermediates. The backward pass scales ``gradient``
    in place and hands it on: it belongs to this call, and nothing reads it
    twice (Paddle 3.3.1's PyLayer crashes on a second backward through a
    retained graph, with or without this).
    """

    @staticmethod
    def forward(ctx, pred, value, gradient, denominator, loss_weight, mean):
        """Args:
            pred: the prediction, only to attach the gradient to.
            value: () weighted sum, or the weighted loss shaped like ``pred``.
            gradient: weighted derivative shaped like ``pred``, in the
                computation dtype.
            denominator: () ``tot + eps`` in the computation dtype.
            loss_weight: python float.
            mean: reduce to ``sum / denominator`` (else element-wise).
        Returns:
            () for ``mean``, else shaped like ``pred``; in the computation dtype.
        """
        ctx.save_for_backward(gradient, denominator)
        ctx.pred_dtype = pred.dtype
        ctx.loss_weight = loss_weight
        ctx.mean = mean
        return reduce_weighted(value, denominator, loss_weight, mean)

    @staticmethod
    def backward(ctx, grad_output):
        grad, denominator = ctx.saved_tensor()
        if ctx.mean:
            grad.multiply_(grad_output * ctx.loss_weight / denominator)
        else:
            grad.multiply_(grad_output * ctx.loss_weight)
        # A wider computation dtype (float32 deltas, float64 targets) is
        # rounded back at the end, as torch's autograd casts at the promotion.
        if grad.dtype != ctx.pred_dtype:
            grad = grad.astype(ctx.pred_dtype)
        return grad, None, None, None


def reduce_weighted(value, denominator, loss_weight: float, mean: bool) -> paddle.Tensor:
    """``value / denominator * loss_weight`` (mmdet's operation order) for the
    mean, ``value * loss_weight`` element-wise."""
    return value / denominator * loss_weight if mean else value * loss_weight
