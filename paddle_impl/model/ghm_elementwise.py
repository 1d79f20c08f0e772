"""The element-wise losses of GHM-C and GHM-R and their derivatives, a chunk at a time.

A GHM loss weights each element's loss by the density of its gradient norm
``g``, the magnitude of the loss's derivative with respect to the prediction
(`paddle_impl.model.ghm_loss`). The classes here hold one call's inputs,
checked and cast as mmdet casts them, and compute for any span of rows of the
first axis (None: all of them):

* `Elementwise.derivative`: d loss / d pred, whose magnitude is ``g``;
* `Elementwise.loss`: the element-wise loss.

Everything runs without autograd, in the computation dtype, and in place
where the inputs are not needed again.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import paddle
import paddle.nn.functional as F

from paddle_impl.model import cpu_kernels, ghm_chunks
from paddle_impl.model.ghm_inputs import as_float32, check_prediction_dtype, difference_dtype, ghmc_index_targets

__all__ = ["Elementwise", "LogitsBCE", "DeltasASL1", "asl1_into"]

_NUMPY_DTYPES = {paddle.float32: np.float32, paddle.float64: np.float64}


# Index and constant tensors, made once: Paddle's arange and full cost tens of
# microseconds, a good share of a call at the small levels. Keyed by the
# place as well, read-only.
@functools.lru_cache(maxsize=16)
def _row_ids(rows: int, dtype, place: str) -> paddle.Tensor:
    """``arange(rows)``."""
    return paddle.arange(rows, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _constant(value: float, dtype, place: str) -> paddle.Tensor:
    """A () tensor holding ``value``."""
    return paddle.full([], value, dtype=dtype)


class Elementwise:
    """One call's inputs; a subclass computes the loss and its derivative.

    Attributes:
        shape: list, the shape the passes compute in: the prediction's, or
            flat where every input has the prediction's shape (a 1-D look-up
            needs no reshaping); `to_pred_shape` undoes it.
        dtype: the computation dtype; ``np_dtype`` its numpy type.
        valid: bool tensor broadcastable to ``shape``: label weight > 0.
        tot: numpy scalar in the computation dtype, the normaliser.
        place: the prediction's place, as a string.
        threaded: whether the chunks run on threads (`ghm_chunks.threaded`).
        bounded: ``g`` cannot exceed 1 but by rounding (see
            `gradient_density.byte_regions`).
    """

    bounded = True

    def __init__(self, pred: paddle.Tensor, dtype, valid: paddle.Tensor, tot, flat: bool = False):
        self.pred_shape = list(pred.shape)
        self.shape = [pred.size] if flat else self.pred_shape
        self.dtype = dtype
        self.np_dtype = _NUMPY_DTYPES[dtype]
        self.valid = valid
        self.tot = self.np_dtype(tot)
        self.place = str(pred.place)
        self.threaded = ghm_chunks.threaded(math.prod(self.shape), pred.place.is_cpu_place())

    def rows(self, tensor: Optional[paddle.Tensor], span) -> Optional[paddle.Tensor]:
        """The rows ``span`` of a tensor that broadcasts to ``shape``: a view
        where it has all the rows, else the tensor itself (it broadcasts along
        the first axis)."""
        if (tensor is None or span is None or tensor.ndim != len(self.shape)
                or tensor.shape[0] != self.shape[0]):
            return tensor
        return tensor[span[0]:span[1]]

    def to_pred_shape(self, tensor: paddle.Tensor) -> paddle.Tensor:
        """A tensor of ``shape`` viewed in the prediction's shape."""
        return tensor if self.shape == self.pred_shape else tensor.reshape(self.pred_shape)

    def derivative(self, span, out: Optional[paddle.Tensor] = None) -> paddle.Tensor:
        """d loss / d pred on the rows ``span``, into ``out`` when given."""
        raise NotImplementedError

    def loss(self, span) -> paddle.Tensor:
        """The element-wise loss on the rows ``span``, a new tensor."""
        raise NotImplementedError


class LogitsBCE(Elementwise):
    """Binary cross-entropy on logits, for GHM-C.

    The targets and the label weights are cast to float32 first, as mmdet's
    ``.float()`` does (a soft float64 target is rounded, a float64 weight too
    small for float32 does not count); the targets then take the logits'
    dtype. Class-index targets (pred (N, C), target (N,)) are never expanded
    to a one-hot: the chunk operations subtract t = 1 at each foreground
    (row, class) pair in place. ``valid`` is then an (N, 1) column and
    ``tot`` counts it times C, as mmdet counts its expanded weights; element-
    wise targets count the label weights as given, before they broadcast.
    ``tot`` is ``max(#valid elements, 1)``.
    """

    def __init__(self, pred: paddle.Tensor, target: paddle.Tensor, label_weight: paddle.Tensor):
        check_prediction_dtype("GHMC", pred)
        self.index_targets = ghmc_index_targets(pred, target, label_weight)
        label_weight = as_float32(label_weight)
        self.logits = pred.detach()
        if self.index_targets:
            num_classes = pred.shape[1]
            labels = target.reshape([-1])
            # Background rows (any label outside [0, C)) address a column in
            # range and subtract t = 0 there.
            self.columns = labels.clip(0, num_classes - 1)
            self.foreground = (self.columns == labels).astype(pred.dtype)
            self.row_ids = _row_ids(pred.shape[0], self.columns.dtype, str(pred.place))
            valid = label_weight.reshape([-1, 1]) > 0
            num_valid = int(valid.sum().numpy()) * num_classes
        else:
            # A soft target outside [0, 1] could give g > 1.
            self.bounded = False
            target = as_float32(target)
            self.target = target if target.dtype == pred.dtype else target.astype(pred.dtype)
            valid = label_weight > 0
            num_valid = int(valid.sum().numpy())
        super().__init__(pred, pred.dtype, valid, max(num_valid, 1))

    def _pairs(self, span):
        """(row ids within the chunk, class column, t) of the index targets on the rows ``span``."""
        if span is None:
            return self.row_ids, self.columns, self.foreground
        start, stop = span
        return self.row_ids[:stop - start], self.columns[start:stop], self.foreground[start:stop]

    def derivative(self, span, out=None):
        """sigmoid(x) - t."""
        d = F.sigmoid(self.rows(self.logits, span), out=out)
        if self.index_targets:
            rows, columns, t = self._pairs(span)
            d.index_put_((rows, columns), -t, accumulate=True)
        else:
            d.subtract_(self.rows(self.target, span))
        return d

    def loss(self, span):
        """``max(x, 0) - t * x + log1p(exp(-|x|))``, which keeps the small losses
        of confident logits that ``softplus(x) - t * x`` cancels to zero
        (x = 17, t = 1: 4.1e-8, not 0)."""
        logits = self.rows(self.logits, span)
        tail = paddle.abs(logits)
        tail.scale_(-1.0)
        tail.exp_()
        cpu_kernels.log1p_(tail)
        loss = F.relu(logits)
        if self.index_targets:
            rows, columns, t = self._pairs(span)
            loss.index_put_((rows, columns), -(logits[rows, columns] * t), accumulate=True)
        else:
            loss.subtract_(logits * self.rows(self.target, span))
        loss.add_(tail)
        return loss


class DeltasASL1(Elementwise):
    """The authentic smooth L1 loss ``sqrt(d^2 + mu^2) - mu``, d = pred - target, for GHM-R.

    ``pred - target`` is computed in the dtype torch's promotion gives
    (`difference_dtype`): the computation dtype. One root serves the loss
    and the derivative ``d / root``, rounded as mmdet rounds both of its
    expressions. mmdet compares the label weights with zero in their own
    dtype but sums them in float32 whatever the other dtypes: ``tot`` is
    ``max(sum(label_weight), 1)``.
    """

    def __init__(self, pred: paddle.Tensor, target: paddle.Tensor, label_weight: paddle.Tensor,
                 mu: float):
        check_prediction_dtype("GHMR", pred)
        dtype = difference_dtype(pred, target)
        self.mu = mu
        flat = pred.ndim > 1 and target.shape == pred.shape and label_weight.shape == pred.shape
        values = pred.detach()
        if flat:
            values, target, label_weight = (t.reshape([-1]) for t in (values, target, label_weight))
        # Widening first is the same exact step as the promotion in ``pred - target``.
        self.values = values if values.dtype == dtype else values.astype(dtype)
        self.target = target if target.dtype == dtype else target.astype(dtype)
        weight_sum = as_float32(label_weight).sum().numpy()
        tot = np.maximum(weight_sum, np.float32(1))
        super().__init__(pred, dtype, cpu_kernels.positive(label_weight), tot, flat)
        self._losses = {}

    def derivative(self, span, out=None):
        """d / sqrt(d^2 + mu^2); keeps the loss of the span for `loss`."""
        values, target = self.rows(self.values, span), self.rows(self.target, span)
        if cpu_kernels.on_cpu(values):
            d, loss = self._host_derivative(values, target, out)
        else:
            d, loss = self._device_derivative(values, target, out)
        self._losses[span] = loss
        return d

    def _device_derivative(self, values, target, out):
        """(d, loss) by Paddle's kernels."""
        diff = values - target
        mu = self.mu
        square = diff * diff + mu * mu
        root = paddle.sqrt(square)
        # Paddle's vectorized float32 sqrt(+inf) is NaN (torch's is +inf);
        # an infinite prediction must give an infinite loss, as in mmdet.
        root.masked_fill_(paddle.isinf(square), _constant(float("inf"), root.dtype, self.place))
        d = paddle.divide(diff, root, out=out)
        # An infinite difference has d = inf / inf = NaN, which mmdet leaves
        # out of every region: its infinite loss gets weight 0, hence NaN.
        # Here the loss is NaN wherever d is, so that any weight gives that.
        loss = root - mu
        loss.add_(paddle.scale(d, 0.0))
        return d, loss

    def _host_derivative(self, values, target, out):
        """(d, loss) of `_device_derivative` by numpy on the tensors' memory.

        Every step is a correctly rounded IEEE operation, the square root
        too, which Paddle's and torch's float32 kernels are not (each is an
        ulp off for about one value in seven, not the same ones). numpy's
        per-operation cost is a microsecond or two where Paddle's is tens,
        which is most of a call at the small levels, and its float32 division
        runs several times faster than Paddle's."""
        shape = values.shape if target.shape == values.shape else list(
            np.broadcast_shapes(tuple(values.shape), tuple(target.shape)))
        d = paddle.empty(shape, dtype=self.dtype) if out is None else out
        loss = paddle.empty(shape, dtype=self.dtype)
        asl1_into(cpu_kernels.view(values), cpu_kernels.view(target), self.np_dtype, self.mu,
                  cpu_kernels.view(d), cpu_kernels.view(loss))
        return d, loss

    def loss(self, span):
        return self._losses.pop(span)


def asl1_into(values: np.ndarray, target: np.ndarray, dtype, mu: float, d: np.ndarray,
              loss: np.ndarray) -> None:
    """GHM-R's host step on numpy arrays: ``d = diff / root`` and ``loss = root - mu``
    with ``diff = values - target`` and ``root = sqrt(diff^2 + mu^2)``, in ``dtype``.

    ``d`` and ``loss`` have the broadcast shape of ``values`` and ``target``.
    Every step is a correctly rounded IEEE operation (see
    `DeltasASL1._host_derivative`); the loss is NaN wherever ``d`` is (see
    `DeltasASL1._device_derivative`). Infinite and NaN inputs are handled as
    in mmdet, silently as torch does.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        diff = np.subtract(values, target, dtype=dtype)
        np.multiply(diff, diff, out=loss)
        np.add(loss, dtype(mu * mu), out=loss)
        np.sqrt(loss, out=loss)
        np.divide(diff, loss, out=d)
        np.subtract(loss, dtype(mu), out=loss)
        np.multiply(d, dtype(0), out=diff)
        np.add(loss, diff, out=loss)
