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
* the reduction is ``sum(weight * loss) / (tot + eps)`` for ``'mean'`` and the
  weighted element-wise loss for ``'none'``, both times ``loss_weight``.
  ``'sum'`` is rejected with a ValueError, as mmdet's ``weight_reduce_loss``
  rejects it with the average factor ``tot`` these losses always pass; the
  check comes before any work, so unlike mmdet a rejected call leaves
  ``acc_sum`` untouched. An ``avg_factor`` argument is accepted and ignored.

Precision. Predictions are float32 in training; float64 predictions are
supported for alignment runs in double precision. Then, as in mmdet, the
losses, gradient norms and weights are in the prediction's dtype and the
targets may stay float32. The buffers keep the dtype the module was given:
``layer.to(dtype='float64')`` widens them like torch's ``module.double()``
(the edges keep their float32 values), and the region arithmetic runs in the
dtype of ``acc_sum``, as mmdet's runs in its buffer's. One rounding of mmdet's
is not copied: its GHM-C casts the targets to float32, and torch's
BCE-with-logits then computes the element-wise loss, and the gradient flowing
into it, in that dtype; here they stay in the prediction's.

mmdet loops over the regions with a host synchronisation in each. Here one
bucketing pass turns ``g`` into integer region ids, one ``bincount`` counts
them and one look-up in a (bins + 2,) table gives every element its weight;
the per-region arithmetic runs on tensors of ``bins`` elements. No value is
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

__all__ = ["GHMC", "GHMR", "build_ghmc", "build_ghmr"]

# mmdet divides by ``tot + torch.finfo(torch.float32).eps``.
_FLOAT32_EPS = float(np.finfo(np.float32).eps)

# How far around each edge (in float32 units in the last place) the fast
# bucketing is checked against the exact comparisons; see `_truncation_is_exact`.
_EDGE_CHECK_ULPS = 16


def _bin_edges(bins: int, last_edge: Optional[float]) -> np.ndarray:
    """The (bins + 1,) float32 edges, rounded exactly as mmdet computes them.

    ``arange(bins + 1).float() / bins`` is a correctly rounded float32
    division, which numpy reproduces bit for bit. GHM-C adds 1e-6 to the last
    edge in float32 (``last_edge=None``); GHM-R replaces it (``1e3``).
    """
    edges = np.arange(bins + 1, dtype=np.float32) / np.float32(bins)
    if last_edge is None:
        edges[-1] = edges[-1] + np.float32(1e-6)
    else:
        edges[-1] = np.float32(last_edge)
    return edges


def _truncation_is_exact(edges: np.ndarray, bins: int) -> bool:
    """Whether ``int(fl32(g * bins))`` gives the region of every g in [0, 1].

    Far from an edge the rounded product ``fl32(g * bins)`` cannot cross an
    integer, and both the float32 edge ``fl32(k / bins)`` and the rounding of
    the product move the boundary by at most about one unit in the last place
    of ``k / bins``. So the truncation and the exact comparisons can only
    disagree for g within a few units of some ``k / bins``; checking every
    float32 within `_EDGE_CHECK_ULPS` of each of them settles the question.
    Whether it holds depends on ``bins``: it does for 10 and 30 (an exhaustive
    check over all float32 in [0, 1] agrees), not for 100.
    """
    centres = np.arange(bins + 1, dtype=np.float32) / np.float32(bins)
    offsets = np.arange(-_EDGE_CHECK_ULPS, _EDGE_CHECK_ULPS + 1, dtype=np.int32)
    g = (centres.view(np.int32)[:, None] + offsets[None, :]).view(np.float32).ravel()
    g = g[(g >= 0) & (g <= 1)]
    exact = np.searchsorted(edges, g, side="right") - 1
    fast = np.minimum((g * np.float32(bins)).astype(np.int32), bins - 1)
    return bool(np.array_equal(exact, fast))


class _HarmonizedLoss(PyLayer):
    """Reduction of the weighted element-wise loss, with its gradient.

    The forward pass receives everything precomputed without autograd:
    ``weighted`` = loss * weights and ``derivative`` = d loss / d pred, both
    shaped like ``pred``, and the per-element ``weights``. The gradient with
    respect to ``pred`` is ``derivative * weights`` times the reduction's
    factor, which is what autograd would give (the weights depend on ``pred``
    only through detached quantities) without keeping a graph of full-size
    intermediates alive.
    """

    @staticmethod
    def forward(ctx, pred, weighted, derivative, weights, denominator, loss_weight, mean):
        """Args:
            pred: the prediction, only to attach the gradient to.
            weighted, derivative, weights: tensors shaped like ``pred``.
            denominator: () ``tot + eps`` in ``pred``'s dtype.
            loss_weight: python float.
            mean: reduce to ``sum / denominator`` (else element-wise).
        Returns:
            () for ``mean``, else shaped like ``pred``.
        """
        ctx.save_for_backward(derivative, weights, denominator)
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
        return grad, None, None, None, None


class _GHMBase(paddle.nn.Layer):
    """Region bookkeeping shared by GHM-C and GHM-R.

    Buffers (both persistable, so ``state_dict()`` holds them under the names
    mmdet uses): ``edges`` (bins + 1,) float32 and ``acc_sum`` (bins,)
    float32, the running region counts, zero until the first call (float64
    after ``to(dtype='float64')``, see the module docstring). After a
    call, ``last_bin_counts`` (bins,) holds that call's region counts. One
    ``acc_sum`` serves every call of the module: a detection head calls it
    once per FPN level and iteration, and each call updates it.
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
        edges = _bin_edges(self.bins, last_edge)
        self.register_buffer("edges", paddle.to_tensor(edges), persistable=True)
        self.register_buffer(
            "acc_sum", paddle.zeros([self.bins], dtype="float32"), persistable=True)
        self._fast_bucketing = _truncation_is_exact(edges, self.bins)

    # Region ids: 0 .. bins-1 are the regions; ``bins`` is an alias of the
    # last region (the fast path puts g == 1 there), ``bins + 1`` collects the
    # elements that are in no region (label weight <= 0, NaN, g >= last edge).

    def _region_ids(self, g: paddle.Tensor, valid: paddle.Tensor) -> paddle.Tensor:
        """Region id of every element; overwrites ``g``.

        Args:
            g: (...) float32 or float64 gradient norms in [0, 1] (or NaN), a
                scratch tensor this call may modify.
            valid: bool tensor broadcastable to ``g``: label weight > 0.
        Returns:
            (...) int32 ids in [0, bins + 1], see above.
        """
        bins = self.bins
        excluded = float(bins + 1)
        # The truncation was checked against the edges for float32 g only: a
        # float64 g can fall between k / bins and its float32 edge.
        if self._fast_bucketing and g.dtype == paddle.float32:
            # Invalid elements get a NaN scale; NaN (from there or from the
            # input) and anything past the range then land on the excluded id.
            scale = paddle.where(valid,
                                 paddle.full([1], float(bins), dtype=g.dtype),
                                 paddle.full([1], float("nan"), dtype=g.dtype))
            g.multiply_(scale)
            g.clip_(max=excluded)
            g.masked_fill_(paddle.isnan(g), excluded)
            return g.astype("int32")
        # Exact comparisons with the edges where the truncation is not exact:
        # searchsorted (right side) returns i + 1 for edges[i] <= g <
        # edges[i + 1], and bins + 1 for NaN or g >= the last edge.
        masked = paddle.where(valid, g, paddle.full([1], float("inf"), dtype=g.dtype))
        # Widening the edges to g's dtype is exact, so the comparisons are
        # those of torch, which promotes the float32 edges the same way.
        edges = self.edges.astype(g.dtype) if self.edges.dtype != g.dtype else self.edges
        ids = paddle.searchsorted(edges, masked, right=True, out_int32=True) - 1
        return ids + (ids == bins).astype("int32")

    def _element_weights(self, ids: paddle.Tensor, tot: paddle.Tensor) -> paddle.Tensor:
        """Per-element GHM weights, updating ``acc_sum`` when momentum > 0.

        Args:
            ids: (...) int32 region ids from `_region_ids`.
            tot: () the normaliser ``tot`` of the call, in the dtype of the
                weights to return (the prediction's).
        Returns:
            (...) weights in ``tot``'s dtype, zero for excluded elements.
        """
        bins = self.bins
        counts = paddle.bincount(ids.reshape([-1]), minlength=bins + 2)
        # Fold the alias of the last region into it; drop the excluded id.
        counts = paddle.concat([counts[:bins - 1], counts[bins - 1:bins + 1].sum(keepdim=True)])
        # Kept for inspection (alignment reports compare them with mmdet's).
        self.last_bin_counts = counts
        nonempty = counts > 0
        counts64 = counts.astype("float64")
        mmt = self.momentum
        dtype = tot.dtype
        if mmt > 0:
            # mmdet: acc = mmt * acc + (1 - mmt) * num with the first product
            # in the buffer's dtype and the second in double, then tot / acc
            # evaluated as reciprocal(acc) * tot in the buffer's dtype; the
            # result is stored into the weights (the prediction's dtype).
            acc_dtype = self.acc_sum.dtype
            decayed = self.acc_sum * paddle.full([1], mmt, dtype=acc_dtype)
            fresh = (counts64 * (1.0 - mmt)).astype(acc_dtype)
            acc = paddle.where(nonempty, decayed + fresh, self.acc_sum)
            paddle.assign(acc, output=self.acc_sum)
            per_region = (paddle.reciprocal(acc) * tot.astype(acc_dtype)).astype(dtype)
        else:
            # mmdet: tot / num in double, stored into the weights.
            per_region = (tot.astype("float64") / counts64).astype(dtype)
        per_region = paddle.where(nonempty, per_region, paddle.zeros_like(per_region))
        # Divide by the number of non-empty regions; with none, every weight
        # is already zero and the division by one changes nothing.
        num_nonempty = nonempty.astype(dtype).sum()
        per_region = per_region / paddle.maximum(num_nonempty, paddle.ones_like(num_nonempty))
        table = paddle.concat([per_region, per_region[bins - 1:], paddle.zeros([1], dtype=dtype)])
        return paddle.gather(table, ids.reshape([-1])).reshape(ids.shape)

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
            return self._element_weights(ids, tot)

    def _harmonized(self, pred, loss, derivative, valid, tot, reduction):
        """Weight ``loss`` by region and reduce it.

        Args:
            pred: the prediction the gradient flows to.
            loss, derivative: element-wise loss and d loss / d pred, without
                autograd, shaped like ``pred``; ``loss`` is overwritten.
            valid: bool, broadcastable to ``pred``.
            tot: () normaliser in ``pred``'s dtype.
            reduction: 'mean' or 'none'.
        """
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
            weights shaped like ``pred`` in its dtype, zero for excluded
            elements, without ``loss_weight``.
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
            target: targets in [0, 1] shaped like ``pred`` (binary in
                practice; a value outside [0, 1] could give g > 1, which
                mmdet leaves out of every region and this implementation may
                put in the last), or, for ``pred`` (N, C), (N,) integer class
                indices, where any value outside [0, C) (the background index
                C, or a negative one) means "no foreground class".
            label_weight: broadcastable to ``pred`` ((N, C), (N, 1), (1, C),
                a scalar...), or N values with index targets; an element
                counts when its weight is > 0, and ``tot`` counts the
                positive entries of ``label_weight`` as given (mmdet's rule),
                except that index targets expand it to (N, C) first, as
                mmdet does. Only the sign matters: the weights do not scale
                the loss.
            reduction_override: None, 'mean' or 'none'.
            **kwargs: ignored (the head passes ``avg_factor``).
        Returns:
            () loss for 'mean', (N, C) for 'none'.
        """
        reduction = self._resolve_reduction(reduction_override)
        loss, derivative, valid, tot = self._elementwise(pred, target, label_weight)
        return self._harmonized(pred, loss, derivative, valid, tot, reduction)

    def _elementwise(self, pred, target, label_weight):
        """Element-wise BCE, its derivative, the validity and ``tot``.

        Returns:
            loss, derivative: shaped like ``pred`` in its dtype, without autograd.
            valid: bool, broadcastable to ``pred`` ((N, 1) for index targets).
            tot: () ``max(#valid elements, 1)`` in ``pred``'s dtype.
        """
        index_targets = _check_ghmc_shapes(pred, target, label_weight)
        with paddle.no_grad():
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


def _check_ghmc_shapes(pred, target, label_weight) -> bool:
    """Whether the targets are class indices; a ValueError naming the shapes when the
    inputs do not fit together (mmdet would fail later, or silently broadcast)."""
    pred_shape, target_shape = list(pred.shape), list(target.shape)
    weight_shape = list(label_weight.shape)
    if len(target_shape) != len(pred_shape):
        if len(pred_shape) != 2 or len(target_shape) != 1 or target_shape[0] != pred_shape[0]:
            raise ValueError(f"GHMC: class-index targets need pred (N, C) and target (N,), "
                             f"got pred {pred_shape} and target {target_shape}")
        if int(np.prod(weight_shape)) != pred_shape[0]:
            raise ValueError(f"GHMC: with class-index targets label_weight needs N = {pred_shape[0]} "
                             f"values, got label_weight {weight_shape} for pred {pred_shape}")
        return True
    if target_shape != pred_shape:
        raise ValueError(f"GHMC: target {target_shape} must have the shape of pred {pred_shape}")
    try:
        broadcast = list(np.broadcast_shapes(tuple(weight_shape), tuple(pred_shape)))
    except ValueError:
        broadcast = None
    if broadcast != pred_shape:
        raise ValueError(f"GHMC: label_weight {weight_shape} does not broadcast to pred {pred_shape}")
    return False


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
            target: (N, 4) regression targets, same shape as ``pred``.
            label_weight: (N, 4) box weights; an element counts when > 0 and
                ``tot`` is their sum (so four per positive anchor).
            avg_factor: ignored, as in mmdet.
            reduction_override: None, 'mean' or 'none'.
        Returns:
            () loss for 'mean', (N, 4) for 'none'.
        """
        reduction = self._resolve_reduction(reduction_override)
        loss, derivative, valid, tot = self._elementwise(pred, target, label_weight)
        return self._harmonized(pred, loss, derivative, valid, tot, reduction)

    def _elementwise(self, pred, target, label_weight):
        """Element-wise ASL1 loss, its derivative, the validity and ``tot``.

        Returns:
            loss, derivative: shaped like ``pred`` in its dtype, without autograd.
            valid: bool, shaped like ``label_weight``.
            tot: () ``max(sum(label_weight), 1)`` in ``pred``'s dtype.
        """
        mu = self.mu
        with paddle.no_grad():
            # mmdet subtracts float32 targets from float64 predictions with
            # type promotion; widening them first is the same exact step.
            if target.dtype != pred.dtype:
                target = target.astype(pred.dtype)
            diff = pred.detach() - target
            # One root serves the loss and the derivative d / root,
            # rounded as mmdet rounds both of its expressions.
            square = diff * diff + mu * mu
            root = paddle.sqrt(square)
            # Paddle's vectorized float32 sqrt(+inf) is NaN (torch's is +inf);
            # an infinite prediction must give an infinite loss, as in mmdet.
            root = paddle.where(paddle.isinf(square), square, root)
            loss = root - mu
            derivative = diff / root
            # mmdet sums the weights in float32 whatever the prediction's dtype.
            label_weight = label_weight.astype("float32")
            tot = paddle.maximum(label_weight.sum(), paddle.ones([], dtype="float32")).astype(pred.dtype)
            valid = label_weight > 0
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
