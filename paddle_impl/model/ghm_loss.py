"""Gradient Harmonizing Mechanism losses: GHM-C and GHM-R.

Li, Liu and Wang, "Gradient Harmonized Single-stage Detector" (AAAI 2019,
arXiv:1811.05181). Every element gets a gradient norm ``g`` in [0, 1], the
magnitude of its loss's derivative with respect to the prediction. The range
is cut into ``bins`` unit regions and an element is weighted by
``tot / (number of elements in its region)``, divided by the number of
non-empty regions, so that the many easy elements (and the few outliers) stop
dominating the loss.

The numerical semantics are those of mmdet 3.3.0's ``GHMC`` and ``GHMR``
(``mmdet/models/losses/ghm_loss.py``), which the tests compare against:

* edges are ``arange(bins + 1) / bins`` in float32; GHM-C raises the last edge
  by 1e-6, GHM-R sets it to 1e3; an element is in region ``i`` when
  ``edges[i] <= g < edges[i + 1]`` and its label weight is positive;
* GHM-C: binary cross-entropy on logits, ``g = |sigmoid(pred) - target|``,
  ``tot = max(#valid elements, 1)``;
  GHM-R: the authentic smooth L1 loss ``sqrt(d^2 + mu^2) - mu`` with
  ``d = pred - target``, ``g = |d| / sqrt(d^2 + mu^2)``,
  ``tot = max(sum(label_weight), 1)``;
* with ``momentum > 0`` a per-region running count ``acc_sum`` replaces the
  count, and only non-empty regions are updated (empty ones are not decayed);
  as in mmdet, the buffer exists only then: with momentum 0 the state dict
  holds ``edges`` alone;
* the reduction is ``sum(weight * loss) / (tot + eps)`` for ``'mean'`` and the
  weighted element-wise loss for ``'none'``, both times ``loss_weight``.
  ``'sum'`` is rejected with a ValueError, as mmdet's ``weight_reduce_loss``
  rejects it with the average factor ``tot`` these losses always pass; the
  check comes before any work, so unlike mmdet a rejected call leaves
  ``acc_sum`` untouched. An ``avg_factor`` argument is accepted and ignored.

Precision and dtypes. Predictions are float32 in training; float64
predictions are supported for alignment runs in double precision, and any
other dtype is a ValueError. The output has the dtype mmdet's has, the
gradient the prediction's:

* GHM-C casts the targets and the label weights to float32 as mmdet's
  ``.float()`` does (a soft float64 target is rounded, a float64 weight too
  small for float32 is not positive), so integer and bool targets and weights
  are accepted; class-index targets must be int32 or int64, the dtypes torch
  indexes with (others are a ValueError naming the dtype). The losses,
  gradient norms, weights and output are in the prediction's dtype.
* GHM-R computes ``pred - target`` in the dtype torch's type promotion
  gives: the wider of two floats (a float32 prediction with float64 targets
  gives a float64 loss), the prediction's with integer targets, and a 0-dim
  target does not widen a prediction with dimensions; a bool target is a
  ValueError naming the dtypes, as torch refuses to subtract it. The losses,
  gradient norms, weights and output are in that dtype, and the gradient is
  rounded to the prediction's dtype at the end, where torch's autograd casts
  it. The label weights are compared with zero in their own dtype and summed
  in float32.

The buffers keep the dtype the module was given:
``layer.to(dtype='float64')`` widens them like torch's ``module.double()``
(the edges keep their float32 values), and the region arithmetic runs in the
dtype of ``acc_sum``, as mmdet's runs in its buffer's. One rounding of mmdet's
is not copied: its GHM-C casts the targets to float32, and torch's
BCE-with-logits then computes the element-wise loss, and the gradient flowing
into it, in that dtype; here they stay in the prediction's.

mmdet loops over the regions with a host synchronisation in each. Here
(`paddle_impl.model.gradient_density`) one bucketing pass turns ``g`` into
integer region ids, one ``bincount`` counts them and one look-up in a
(bins + 2,) table gives every element its weight; the per-region arithmetic
runs on tensors of ``bins`` elements. No value is
read back to the host (on a GPU ``paddle.bincount`` synchronises once to size
its output). At the reference scale (24M elements per call) fresh
full-size tensors cost as much as the arithmetic, so the work is done in
place wherever the gradient does not need the old values, and the gradient
itself is written by hand (`_HarmonizedLoss`): ``weight * dloss/dpred`` from
tensors the forward pass computes anyway.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from paddle_impl.config import get_config
from paddle_impl.model.ghm_inputs import as_float32, check_prediction_dtype, difference_dtype, ghmc_index_targets
from paddle_impl.model.gradient_density import (bin_edges, density_weights, region_ids,
                                                  truncation_is_exact)

__all__ = ["GHMC", "GHMR", "build_ghmc", "build_ghmr"]

# mmdet divides by ``tot + torch.finfo(torch.float32).eps``.
_FLOAT32_EPS = float(np.finfo(np.float32).eps)


class _HarmonizedLoss(PyLayer):
    """Reduction of the weighted element-wise loss, with its gradient.

    The forward pass receives everything precomputed without autograd:
    ``weighted`` = loss * weights and ``derivative`` = d loss / d pred, both
    shaped like ``pred``, and the per-element ``weights``, all in the loss's
    computation dtype (``pred``'s, or wider for GHM-R). The gradient with
    respect to ``pred`` is ``derivative * weights`` times the reduction's
    factor, in ``pred``'s dtype, which is what autograd would give (the
    weights depend on ``pred`` only through detached quantities) without
    keeping a graph of full-size intermediates alive.
    """

    @staticmethod
    def forward(ctx, pred, weighted, derivative, weights, denominator, loss_weight, mean):
        """Args:
            pred: the prediction, only to attach the gradient to.
            weighted, derivative, weights: tensors shaped like ``pred``, in
                the computation dtype.
            denominator: () ``tot + eps`` in the computation dtype.
            loss_weight: python float.
            mean: reduce to ``sum / denominator`` (else element-wise).
        Returns:
            () for ``mean``, else shaped like ``pred``; in the computation dtype.
        """
        ctx.save_for_backward(derivative, weights, denominator)
        ctx.pred_dtype = pred.dtype
        ctx.loss_weight = loss_weight
        ctx.mean = mean
        if mean:
            # The operation order of mmdet: (sum / (tot + eps)) * loss_weight.
            # A float64 sum: float32 accumulation over millions of elements
            # drifts ~1e-6 from torch's cascaded float32 sum.
            total = weighted.sum(dtype="float64").astype(weighted.dtype)
            return total / denominator * loss_weight
        return weighted * loss_weight

    @staticmethod
    def backward(ctx, grad_output):
        derivative, weights, denominator = ctx.saved_tensor()
        grad = derivative * weights
        if ctx.mean:
            grad.multiply_(grad_output * ctx.loss_weight / denominator)
        else:
            grad.multiply_(grad_output * ctx.loss_weight)
        # A wider computation dtype (float32 deltas, float64 targets) is
        # rounded back at the end, as torch's autograd casts at the promotion.
        if grad.dtype != ctx.pred_dtype:
            grad = grad.astype(ctx.pred_dtype)
        return grad, None, None, None, None


class _GHMBase(paddle.nn.Layer):
    """Region bookkeeping shared by GHM-C and GHM-R.

    Buffers (persistable, so ``state_dict()`` holds them under the names and
    in the order mmdet uses): ``edges`` (bins + 1,) float32 and, only when
    momentum > 0, ``acc_sum`` (bins,) float32, the running region counts,
    zero until the first call (float64 after ``to(dtype='float64')``, see the
    module docstring). After a call, ``last_bin_counts`` (bins,) holds that
    call's region counts. One ``acc_sum`` serves every call of the module: a
    detection head calls it once per FPN level and iteration, and each call
    updates it.
    """

    def __init__(self, bins: int, momentum: float, loss_weight: float,
                 reduction: str, last_edge: Optional[float]):
        super().__init__()
        if bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins}")
        self.bins = int(bins)
        self.momentum = momentum
        self.loss_weight = loss_weight
        self.reduction = reduction
        edges = bin_edges(self.bins, last_edge)
        self.register_buffer("edges", paddle.to_tensor(edges), persistable=True)
        # Without momentum there is no running count, and mmdet registers no
        # buffer for it: the state dicts then hold ``edges`` alone.
        if momentum > 0:
            self.register_buffer(
                "acc_sum", paddle.zeros([self.bins], dtype="float32"), persistable=True)
        self._fast_bucketing = truncation_is_exact(edges, self.bins)

    def _region_ids(self, g: paddle.Tensor, valid: paddle.Tensor) -> paddle.Tensor:
        """Region id of every element; overwrites ``g``.

        Args:
            g: (...) float32 or float64 gradient norms, a scratch tensor.
            valid: bool tensor broadcastable to ``g``: label weight > 0.
        Returns:
            (...) int32 ids in [0, bins + 1] (see `gradient_density`).
        """
        return region_ids(g, valid, self.edges, self._fast_bucketing)

    def _resolve_reduction(self, reduction_override: Optional[str]) -> str:
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"unknown reduction_override {reduction_override!r}")
        reduction = reduction_override if reduction_override else self.reduction
        if reduction not in ("none", "mean"):
            raise ValueError('avg_factor can not be used with reduction="sum"')
        return reduction

    def _weights(self, derivative: paddle.Tensor, valid: paddle.Tensor,
                 tot: paddle.Tensor) -> paddle.Tensor:
        """Per-element weights from the loss derivative (updates ``acc_sum``).

        Args:
            derivative: d loss / d pred, without autograd; g is its magnitude.
            valid: bool, broadcastable to ``derivative``.
            tot: () normaliser in ``derivative``'s dtype.
        Returns:
            weights shaped like ``derivative``, in its dtype.
        """
        with paddle.no_grad():
            ids = self._region_ids(paddle.abs(derivative), valid)
            acc_sum = self.acc_sum if self.momentum > 0 else None
            weights, counts = density_weights(ids, tot, self.bins, self.momentum, acc_sum)
        # Kept for inspection (alignment reports compare them with mmdet's).
        self.last_bin_counts = counts
        return weights

    def _elementwise(self, pred: paddle.Tensor, target: paddle.Tensor,
                     label_weight: paddle.Tensor):
        """The element-wise loss, its derivative, the validity and ``tot``.

        Args:
            pred, target, label_weight: the inputs of ``forward``.
        Returns:
            loss, derivative: shaped like ``pred``, without autograd, in the
                computation dtype: ``pred``'s, or for GHM-R the promoted dtype
                of ``pred - target``.
            valid: bool, broadcastable to ``pred``: the label weight is > 0.
            tot: () normaliser in the computation dtype.
        """
        raise NotImplementedError

    def _loss(self, pred: paddle.Tensor, target: paddle.Tensor, label_weight: paddle.Tensor,
              reduction_override: Optional[str]) -> paddle.Tensor:
        """The loss of ``forward``: element-wise, weighted by region, reduced.

        Args:
            pred, target, label_weight: the inputs of ``forward``; ``pred`` is
                what the gradient flows to.
            reduction_override: None, 'mean' or 'none'.
        Returns:
            () for 'mean', else shaped like ``pred``.
        """
        reduction = self._resolve_reduction(reduction_override)
        loss, derivative, valid, tot = self._elementwise(pred, target, label_weight)
        weights = self._weights(derivative, valid, tot)
        with paddle.no_grad():
            weighted = loss.multiply_(weights)
            denominator = tot + _FLOAT32_EPS
        return _HarmonizedLoss.apply(pred, weighted, derivative, weights, denominator,
                                     float(self.loss_weight), reduction == "mean")

    def harmonizing_weights(self, pred: paddle.Tensor, target: paddle.Tensor,
                            label_weight: paddle.Tensor) -> paddle.Tensor:
        """The per-element GHM weights a call with these inputs applies.

        For inspection and alignment (mmdet's weights are the ``weights``
        tensor inside its forward). Takes the inputs of ``forward`` and, like
        a call, advances ``acc_sum`` when momentum > 0.

        Returns:
            weights shaped like ``pred`` in the computation dtype (that of
            the loss), zero for excluded elements, without ``loss_weight``.
        """
        _, derivative, valid, tot = self._elementwise(pred, target, label_weight)
        return self._weights(derivative, valid, tot)

    def extra_repr(self) -> str:
        return (f"bins={self.bins}, momentum={self.momentum}, "
                f"loss_weight={self.loss_weight}, reduction={self.reduction!r}")


class GHMC(_GHMBase):
    """GHM classification loss on sigmoid binary cross-entropy.

    Args:
        bins: number of unit regions of the gradient norm.
        momentum: moving-average factor of the region counts (0: none).
        use_sigmoid: must be True; only the sigmoid form exists.
        loss_weight: factor on the returned loss.
        reduction: 'mean' or 'none' (see the module docstring for 'sum').
    """

    def __init__(self, bins: int = 10, momentum: float = 0, use_sigmoid: bool = True,
                 loss_weight: float = 1.0, reduction: str = "mean"):
        super().__init__(bins, momentum, loss_weight, reduction, last_edge=None)
        if not use_sigmoid:
            raise NotImplementedError("GHMC only supports use_sigmoid=True")
        self.use_sigmoid = use_sigmoid

    def forward(self, pred: paddle.Tensor, target: paddle.Tensor, label_weight: paddle.Tensor,
                reduction_override: Optional[str] = None, **kwargs) -> paddle.Tensor:
        """The GHM-C loss.

        Args:
            pred: (N, C) float32 (or float64) logits; element-wise targets
                accept any shape.
            target: targets in [0, 1] shaped like ``pred``, of any float,
                integer or bool dtype, cast to float32 (binary in practice; a
                value outside [0, 1] could give g > 1, which mmdet leaves out
                of every region and this implementation may put in the last),
                or, for ``pred`` (N, C), (N,) int32 or int64 class indices,
                where any value outside [0, C) (the background index C, or a
                negative one) means "no foreground class".
            label_weight: broadcastable to ``pred`` ((N, C), (N, 1), (1, C),
                a scalar...), or N values with index targets; an element
                counts when its weight is > 0, and ``tot`` counts the
                positive entries of ``label_weight`` as given (mmdet's rule),
                except that index targets expand it to (N, C) first, as
                mmdet does. Only the sign (after a cast to float32) matters:
                the weights do not scale the loss.
            reduction_override: None, 'mean' or 'none'.
            **kwargs: ignored (the head passes ``avg_factor``).
        Returns:
            () loss for 'mean', (N, C) for 'none', in ``pred``'s dtype.
        """
        return self._loss(pred, target, label_weight, reduction_override)

    def _elementwise(self, pred, target, label_weight):
        """Binary cross-entropy on logits; ``valid`` is (N, 1) for index
        targets, ``tot`` is ``max(#valid elements, 1)``."""
        check_prediction_dtype("GHMC", pred)
        index_targets = ghmc_index_targets(pred, target, label_weight)
        with paddle.no_grad():
            # mmdet casts the targets and the label weights to float32 first:
            # a soft float64 target is rounded, a float64 weight too small for
            # float32 does not count.
            label_weight = as_float32(label_weight)
            logits = pred.detach()
            # The derivative of BCE with logits is sigmoid(x) - t; g is its magnitude.
            derivative = F.sigmoid(logits)
            # BCE with logits as max(x, 0) - t * x + log1p(exp(-|x|)), which
            # keeps the small losses of confident logits that softplus(x) - t * x
            # cancels to zero (x = 17, t = 1: 4.1e-8, not 0).
            loss = F.relu(logits)
            if index_targets:
                # Index targets: subtract t = 1 at each foreground (row,
                # class) pair in place, instead of building an (N, C) one-hot.
                # Background rows address column 0 and subtract zero.
                num_samples, num_classes = pred.shape
                labels = target.reshape([-1])
                foreground = (labels >= 0) & (labels < num_classes)
                cols = paddle.where(foreground, labels, paddle.zeros_like(labels))
                rows = paddle.arange(num_samples, dtype=cols.dtype)
                t = foreground.astype(pred.dtype)
                derivative.index_put_((rows, cols), -t, accumulate=True)
                loss.index_put_((rows, cols), -(logits[rows, cols] * t), accumulate=True)
                # mmdet expands per-sample weights to (N, C) and counts that;
                # an (N, 1) column broadcasts the same way without the copy.
                valid = label_weight.reshape([-1, 1]) > 0
                num_valid = valid.astype("int64").sum() * num_classes
            else:
                target = as_float32(target)
                if target.dtype != pred.dtype:
                    target = target.astype(pred.dtype)
                derivative.subtract_(target)
                loss.subtract_(logits * target)
                # mmdet counts the weights as given, before they broadcast.
                valid = label_weight > 0
                num_valid = valid.astype("int64").sum()
            tail = paddle.abs(logits)
            tail.scale_(-1.0)
            tail.exp_()
            tail.log1p_()
            loss.add_(tail)
            del tail
            tot = paddle.maximum(num_valid.astype(pred.dtype), paddle.ones([], dtype=pred.dtype))
        return loss, derivative, valid, tot


class GHMR(_GHMBase):
    """GHM regression loss on the authentic smooth L1 (ASL1) loss.

    Args:
        mu: the ASL1 parameter; the loss is ``sqrt(d^2 + mu^2) - mu``.
        bins: number of unit regions of the gradient norm.
        momentum: moving-average factor of the region counts (0: none).
        loss_weight: factor on the returned loss.
        reduction: 'mean' or 'none' (see the module docstring for 'sum').
    """

    def __init__(self, mu: float = 0.02, bins: int = 10, momentum: float = 0,
                 loss_weight: float = 1.0, reduction: str = "mean"):
        super().__init__(bins, momentum, loss_weight, reduction, last_edge=1e3)
        self.mu = mu

    def forward(self, pred: paddle.Tensor, target: paddle.Tensor, label_weight: paddle.Tensor,
                avg_factor=None, reduction_override: Optional[str] = None) -> paddle.Tensor:
        """The GHM-R loss.

        Args:
            pred: (N, 4) float32 (or float64) box deltas (any shape works,
                element-wise).
            target: (N, 4) regression targets, same shape as ``pred``, of
                any float or integer dtype.
            label_weight: (N, 4) box weights of any real or bool dtype; an
                element counts when > 0 and ``tot`` is their float32 sum (so
                four per positive anchor).
            avg_factor: ignored, as in mmdet.
            reduction_override: None, 'mean' or 'none'.
        Returns:
            () loss for 'mean', (N, 4) for 'none', in the dtype torch gives
            ``pred - target`` (float64 when either is float64).
        """
        return self._loss(pred, target, label_weight, reduction_override)

    def _elementwise(self, pred, target, label_weight):
        """The ASL1 loss; ``valid`` is shaped like ``label_weight``, ``tot`` is
        ``max(sum(label_weight), 1)``."""
        check_prediction_dtype("GHMR", pred)
        dtype = difference_dtype(pred, target)
        mu = self.mu
        with paddle.no_grad():
            # mmdet's ``pred - target`` promotes both to ``dtype``, where the
            # loss, the gradient norms and the weights then live; widening
            # first is the same exact step.
            values = pred.detach()
            if values.dtype != dtype:
                values = values.astype(dtype)
            if target.dtype != dtype:
                target = target.astype(dtype)
            diff = values - target
            # One root serves the loss and the derivative d / root,
            # rounded as mmdet rounds both of its expressions.
            square = diff * diff + mu * mu
            root = paddle.sqrt(square)
            # Paddle's vectorized float32 sqrt(+inf) is NaN (torch's is +inf);
            # an infinite prediction must give an infinite loss, as in mmdet.
            root = paddle.where(paddle.isinf(square), square, root)
            loss = root - mu
            derivative = diff / root
            # mmdet compares the weights with zero in their own dtype, but sums
            # them in float32 whatever the other dtypes.
            valid = label_weight > 0
            weight_sum = as_float32(label_weight).sum()
            tot = paddle.maximum(weight_sum, paddle.ones([], dtype="float32")).astype(dtype)
        return loss, derivative, valid, tot


def build_ghmc(**overrides) -> GHMC:
    """GHMC with the reference configuration's ``loss_cls`` options."""
    options = get_config()["bbox_head"]["loss_cls"]
    options.update(overrides)
    return GHMC(**options)


def build_ghmr(**overrides) -> GHMR:
    """GHMR with the reference configuration's ``loss_bbox`` options."""
    options = get_config()["bbox_head"]["loss_bbox"]
    options.update(overrides)
    return GHMR(**options)
