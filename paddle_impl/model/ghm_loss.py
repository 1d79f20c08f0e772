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

mmdet loops over the regions with a host synchronisation in each. Here the
element-wise work runs over chunks of the first axis (`ghm_chunks`: about a
megabyte of float32 each, on Paddle's CPU threads, ``OMP_NUM_THREADS``) in two
passes, so that the few operations on a chunk find it in the cache and no
tensor of the full size is made but the ones the call returns or keeps:

1. each chunk's loss derivative (``sigmoid(x) - t``, or ``d / sqrt(d^2 +
   mu^2)``) and the region id of its magnitude ``g`` (`gradient_density`);
   the call's region counts are read back once, and numpy turns them into one
   weight per region id (the arithmetic of a few dozen scalars, in mmdet's
   dtypes and order);
2. each chunk's element-wise loss, weighted by a look-up of its ids and
   reduced; the derivative, kept when a gradient is wanted, is weighted in
   place and becomes the gradient, which the backward pass only scales
   (`ghm_gradient`).

The element-wise values (loss, derivative, ``g``, ids) are those the same
operations give on the whole tensor. The mean sums runs of 16 elements in
float32 and the runs in float64.

Smaller float32 calls on the CPU, which the chunks would run on one thread,
skip the Paddle tensors of the two passes: `ghm_host` computes the same
steps in numpy on the inputs' memory, at a fraction of their per-call cost
(``make bench-ghm``; its figures are in ``docs/benchmarks.md``).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import paddle

from paddle_impl.config import get_config
from paddle_impl.model import cpu_kernels, ghm_chunks, ghm_host
from paddle_impl.model.ghm_gradient import HarmonizedLoss, reduce_weighted
from paddle_impl.model.ghm_elementwise import DeltasASL1, Elementwise, LogitsBCE
from paddle_impl.model.ghm_inputs import check_prediction_dtype, difference_dtype, ghmc_index_targets
from paddle_impl.model.gradient_density import (BYTE_TABLE_SIZE, bin_edges, byte_regions, byte_regions_apply,
                                                  exclusion, region_ids, region_table, truncation_is_exact)

__all__ = ["GHMC", "GHMR", "build_ghmc", "build_ghmr"]

# mmdet divides by ``tot + torch.finfo(torch.float32).eps``.
_FLOAT32_EPS = float(np.finfo(np.float32).eps)
# Elements the mean sums in float32 before float64 takes over.
_RUN = 16


class _GHMBase(paddle.nn.Layer):
    """The two passes and the region bookkeeping shared by GHM-C and GHM-R.

    Buffers (persistable, so ``state_dict()`` holds them under the names and
    in the order mmdet uses): ``edges`` (bins + 1,) float32 and, only when
    momentum > 0, ``acc_sum`` (bins,) float32, the running region counts,
    zero until the first call (float64 after ``to(dtype='float64')``, see the
    module docstring). After a call, ``last_bin_counts`` (bins,) holds that
    call's region counts. One ``acc_sum`` serves every call of the module: a
    detection head calls it once per FPN level and iteration, and each call
    updates it.

    A subclass's ``_problem`` prepares a call's inputs (a `ghm_elementwise.Elementwise`).
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
        self._last_counts = None
        # Small tensors a call fills and reads before it returns, kept from
        # call to call: weight tables, columns of ones.
        self._scratch = {}
        self._host_scratch = ghm_host.Scratch()

    @property
    def last_bin_counts(self) -> paddle.Tensor:
        """(bins,) int64 region counts of the last call."""
        if self._last_counts is None:
            raise AttributeError("last_bin_counts: the layer has not been called")
        return paddle.to_tensor(self._last_counts)

    def _region_ids(self, g: paddle.Tensor, valid: paddle.Tensor) -> paddle.Tensor:
        """Region id of every element; overwrites ``g``.

        The bucketing step of a call when it is observed (see
        `_bucketing_observed`), and of float64 norms or bin counts that
        `byte_regions` does not take.

        Args:
            g: (...) float32 or float64 gradient norms, a scratch tensor.
            valid: bool tensor broadcastable to ``g``: label weight > 0.
        Returns:
            (...) int32 ids in [0, bins + 1] (see `gradient_density`).
        """
        return region_ids(g, valid, self.edges, self._fast_bucketing)

    def _bucketing_observed(self) -> bool:
        """Whether `_region_ids` is replaced, on the layer or by a subclass: an
        inspection hook (the alignment recorders wrap it to see the ``g`` they
        bin). The call then hands it the whole ``g`` at once."""
        return "_region_ids" in vars(self) or type(self)._region_ids is not _GHMBase._region_ids

    def _resolve_reduction(self, reduction_override: Optional[str]) -> str:
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"unknown reduction_override {reduction_override!r}")
        reduction = reduction_override if reduction_override else self.reduction
        if reduction not in ("none", "mean"):
            raise ValueError('avg_factor can not be used with reduction="sum"')
        return reduction

    def _regions(self, problem: Elementwise, keep_derivative: bool):
        """The first pass: every chunk's derivative and region ids, then the weight table.

        Updates ``acc_sum`` (with momentum) and ``last_bin_counts``.

        Returns:
            spans: the chunks (`ghm_chunks.spans`); an observed bucketing
                (`_bucketing_observed`) gets the whole tensor at once.
            ids: per span, uint8 ids of `byte_regions` or int32 of `region_ids`.
            table: (BYTE_TABLE_SIZE or bins + 2,) weights by id, in the
                computation dtype.
            derivative: shaped like the prediction in the computation dtype,
                or None without ``keep_derivative``.
        """
        bins = self.bins
        observed = self._bucketing_observed()
        spans = ghm_chunks.spans(problem.shape, whole=observed)
        use_bytes = self._fast_bucketing and byte_regions_apply(bins, problem.dtype) and not observed
        excluded_by = ()
        if use_bytes:
            excluded_by = exclusion(problem.valid, problem.valid.size < math.prod(problem.shape), bins)
        derivative = None
        if keep_derivative and len(spans) > 1:
            derivative = paddle.empty(problem.shape, dtype=problem.dtype)

        def first_pass(span):
            d = problem.derivative(span, problem.rows(derivative, span))
            g = paddle.abs(d)
            if use_bytes:
                ids, counts = byte_regions(g, tuple(problem.rows(t, span) for t in excluded_by), bins,
                                           problem.bounded)
            else:
                ids = self._region_ids(g, problem.rows(problem.valid, span))
                counts = paddle.bincount(ids.reshape([-1]), minlength=bins + 2)
            return d, ids, counts

        results = ghm_chunks.run(first_pass, spans, problem.threaded)
        if keep_derivative and derivative is None:
            derivative = results[0][0]
        counts = paddle.add_n([r[2] for r in results]) if len(results) > 1 else results[0][2]
        table = self._weight_table(counts.numpy(), problem.tot, BYTE_TABLE_SIZE if use_bytes else bins + 2)
        return spans, [r[1] for r in results], self._table_tensor(table, problem.dtype), derivative

    def _weight_table(self, counts: np.ndarray, tot, size: int) -> np.ndarray:
        """`region_table` of a call's id counts; updates ``acc_sum`` (with momentum)
        and ``last_bin_counts``."""
        acc_sum = self.acc_sum.numpy() if self.momentum > 0 else None
        table, self._last_counts, acc_sum = region_table(counts, tot, self.bins, size, self.momentum, acc_sum)
        if acc_sum is not None:
            self.acc_sum.set_value(acc_sum)
        return table

    def _runs_on_host(self, pred: paddle.Tensor, dtype) -> bool:
        """Whether a call takes `ghm_host`'s path (see `ghm_host.applies`)."""
        return ghm_host.applies(pred, dtype, self._fast_bucketing and byte_regions_apply(self.bins, dtype),
                                self._bucketing_observed())

    def _host_weights(self, arrays: ghm_host.Arrays) -> np.ndarray:
        """The per-element weights of a `ghm_host` call (float32, shaped like its loss)."""
        shape = arrays.derivative.shape
        g = np.abs(arrays.derivative, out=self._host_scratch("g", shape, np.float32))
        ids, counts = ghm_host.byte_ids(g, arrays.invalid, self.bins, self._host_scratch)
        table = self._weight_table(counts, arrays.tot, BYTE_TABLE_SIZE)
        return np.take(table, ids, out=self._host_scratch("weights", shape, np.float32), mode="clip")

    def _host_loss(self, pred: paddle.Tensor, arrays: ghm_host.Arrays, mean: bool,
                   need_grad: bool) -> paddle.Tensor:
        """`_loss` of a `ghm_host` call."""
        value = ghm_host.weighted_loss(arrays, self._host_weights(arrays), mean, _RUN, need_grad)
        denominator = paddle.full([], float(arrays.tot + np.float32(_FLOAT32_EPS)), dtype=pred.dtype)
        if not need_grad:
            return reduce_weighted(value, denominator, float(self.loss_weight), mean)
        return HarmonizedLoss.apply(pred, value, arrays.gradient, denominator, float(self.loss_weight), mean)

    def _table_tensor(self, table: np.ndarray, dtype) -> paddle.Tensor:
        """``table`` in a tensor the layer reuses from call to call (a call reads
        its table only before it returns)."""
        key = ("table", table.shape[0], dtype)
        tensor = self._scratch.get(key)
        if tensor is None:
            tensor = self._scratch[key] = paddle.to_tensor(table)
        else:
            tensor.set_value(table)
        return tensor

    def _ones(self, rows: int, dtype) -> paddle.Tensor:
        """A (rows, 1) column of ones, kept from call to call."""
        key = ("ones", rows, dtype)
        if key not in self._scratch:
            self._scratch[key] = paddle.ones([rows, 1], dtype=dtype)
        return self._scratch[key]

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
        mean = self._resolve_reduction(reduction_override) == "mean"
        need_grad = not pred.stop_gradient and paddle.is_grad_enabled()
        arrays = self._host_arrays(pred, target, label_weight)
        if arrays is not None:
            return self._host_loss(pred, arrays, mean, need_grad)
        with paddle.no_grad():
            problem = self._problem(pred, target, label_weight)
            spans, ids, table, derivative = self._regions(problem, keep_derivative=need_grad)

            def second_pass(span_and_ids):
                span, chunk_ids = span_and_ids
                weighted = problem.loss(span)
                weights = cpu_kernels.take(table, chunk_ids)
                weighted.multiply_(weights)
                if need_grad:
                    problem.rows(derivative, span).multiply_(weights)
                if not mean:
                    return weighted
                # Paddle's float32 sum of a chunk drifts by up to ~1e-6, more
                # where rare regions' large weights meet the common ones'
                # small ones. A product with ones sums runs of 16 elements
                # instead, and the runs add up in float64.
                width = math.gcd(weighted.size, _RUN)
                return paddle.matmul(weighted.reshape([-1, width]), self._ones(width, problem.dtype))

            parts = ghm_chunks.run(second_pass, list(zip(spans, ids)), problem.threaded)
            value = paddle.concat(parts) if len(parts) > 1 else parts[0]
            if mean:
                value = value.sum(dtype="float64").astype(problem.dtype)
            else:
                value = problem.to_pred_shape(value)
            denominator = paddle.full([], float(problem.tot + problem.np_dtype(_FLOAT32_EPS)),
                                      dtype=problem.dtype)
            if not need_grad:
                return reduce_weighted(value, denominator, float(self.loss_weight), mean)
        return HarmonizedLoss.apply(pred, value, problem.to_pred_shape(derivative), denominator,
                                    float(self.loss_weight), mean)

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
        with paddle.no_grad():
            arrays = self._host_arrays(pred, target, label_weight)
            if arrays is not None:
                return paddle.to_tensor(self._host_weights(arrays).reshape(pred.shape))
            problem = self._problem(pred, target, label_weight)
            _, ids, table, _ = self._regions(problem, keep_derivative=False)
            parts = [cpu_kernels.take(table, chunk_ids) for chunk_ids in ids]
            return problem.to_pred_shape(paddle.concat(parts) if len(parts) > 1 else parts[0])

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

    def _problem(self, pred, target, label_weight) -> LogitsBCE:
        return LogitsBCE(pred, target, label_weight)

    def _host_arrays(self, pred, target, label_weight) -> Optional[ghm_host.Arrays]:
        """The call's `ghm_host` arrays, or None where it takes the chunked path."""
        check_prediction_dtype("GHMC", pred)
        index_targets = ghmc_index_targets(pred, target, label_weight)
        if not self._runs_on_host(pred, pred.dtype):
            return None
        return ghm_host.ghmc_arrays(pred, target, label_weight, index_targets, self._host_scratch)


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

    def _problem(self, pred, target, label_weight) -> DeltasASL1:
        return DeltasASL1(pred, target, label_weight, self.mu)

    def _host_arrays(self, pred, target, label_weight) -> Optional[ghm_host.Arrays]:
        """The call's `ghm_host` arrays, or None where it takes the chunked path
        (also where the target or the weights broadcast)."""
        check_prediction_dtype("GHMR", pred)
        dtype = difference_dtype(pred, target)
        if target.shape != pred.shape or label_weight.shape != pred.shape or not self._runs_on_host(pred, dtype):
            return None
        return ghm_host.ghmr_arrays(pred, target, label_weight, self.mu, self._host_scratch)


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
