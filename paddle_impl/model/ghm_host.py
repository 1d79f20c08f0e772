"""A GHM call below the threaded size on the CPU, in numpy from the inputs to the loss and its gradient.

The chunked passes of `paddle_impl.model.ghm_loss` make and view a few dozen
Paddle tensors per call, and each costs microseconds of dispatch: at the
small FPN levels (GHM-R's P7 has 5,544 elements) that fixed cost is most of
the call. A float32 call on the CPU with region ids that fit a byte, smaller
than `ghm_chunks.THREADED_ELEMENTS` (the chunked path would run it on one
thread: GHM-C's P5-P7 and every GHM-R level at the reference scale), runs
here instead: the element-wise steps are numpy operations on the memory of
the inputs, and only the returned value and the gradient become Paddle
tensors. Each step is the chunked path's in numpy (`byte_ids` is
`gradient_density.byte_regions`, the weight table is `region_table` itself),
so the two give the same regions, weights and ``acc_sum``; the tests run
every case through both. The numpy buffers stay with the layer (`Scratch`):
about 21 bytes per element of its largest call here, 32 MB for GHM-C's P5.

Element-wise values:

* GHM-C: ``sigmoid(x) = 1 / (1 + exp(-x))``, the expression torch's kernel
  evaluates (its float32 results and these differ by an ulp now and then,
  as Paddle's do; on 8M logits drawn as the bench draws them, neither
  Paddle's nor this one put a gradient norm in another region than torch's);
  the loss ``max(x, 0) - t * x + log1p(exp(-|x|))`` with the tail evaluated
  in float64 and rounded once;
* GHM-R: `ghm_elementwise.asl1_into`, the chunked path's host step, bit for bit.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import paddle

from paddle_impl.model import cpu_kernels, ghm_chunks
from paddle_impl.model.ghm_elementwise import asl1_into

__all__ = ["applies", "takes_size", "Arrays", "ghmc_arrays", "ghmr_arrays", "byte_ids", "weighted_loss"]


class Arrays(NamedTuple):
    """One call's element-wise arrays, float32, in the shape the call computes in.

    derivative: d loss / d pred, the memory of ``gradient``.
    gradient: a Paddle tensor of the prediction's shape that becomes the
        gradient once weighted.
    loss: the element-wise loss.
    invalid: bool, broadcastable to ``loss``: label weight <= 0.
    tot: float32 normaliser.
    """
    derivative: np.ndarray
    gradient: paddle.Tensor
    loss: np.ndarray
    invalid: np.ndarray
    tot: np.float32


class Scratch:
    """numpy buffers a layer's calls reuse, by name, shape and dtype.

    A fresh array of a few hundred kilobytes is memory mapped anew and
    faulted in page by page, which costs as much as an arithmetic pass over
    it; the buffers of the last call of each shape are kept instead. A call
    reads its buffers only before it returns.
    """

    def __init__(self):
        self._buffers = {}

    def __call__(self, name: str, shape, dtype) -> np.ndarray:
        key = (name, tuple(shape), np.dtype(dtype))
        buffer = self._buffers.get(key)
        if buffer is None:
            # One shape per name: a level's call replaces the last level's.
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] != name}
            buffer = self._buffers[key] = np.empty(shape, dtype)
        return buffer


def applies(pred: paddle.Tensor, dtype, bytes_apply: bool, observed: bool) -> bool:
    """Whether a call runs here: on the CPU, computing in float32 (``dtype``),
    below the threaded size, with byte ids (``bytes_apply``) and no observed
    bucketing."""
    return (bytes_apply and not observed and dtype == paddle.float32 and cpu_kernels.on_cpu(pred)
            and takes_size(pred.size))


def takes_size(numel: int) -> bool:
    """Whether a call of ``numel`` elements is small enough for this path."""
    return numel < ghm_chunks.THREADED_ELEMENTS


def _float32(tensor: paddle.Tensor) -> np.ndarray:
    """torch's ``.float()`` of a CPU tensor, as numpy (a view when it is float32 already)."""
    return cpu_kernels.view(tensor).astype(np.float32, copy=False)


def ghmc_arrays(pred: paddle.Tensor, target: paddle.Tensor, label_weight: paddle.Tensor,
                index_targets: bool, scratch: Scratch) -> Arrays:
    """GHM-C's arrays; the inputs checked by `ghm_inputs.ghmc_index_targets`.

    Args:
        pred: (N, C) float32 logits (any shape with element-wise targets).
        target: (N,) class indices, or targets shaped like ``pred``.
        label_weight: N values with index targets, else broadcastable to ``pred``.
    """
    x = cpu_kernels.view(pred.detach())
    gradient = paddle.empty(pred.shape, dtype=pred.dtype)
    s = cpu_kernels.view(gradient)
    one = np.float32(1)
    with np.errstate(over="ignore"):
        np.negative(x, out=s)
        np.exp(s, out=s)
        np.add(s, one, out=s)
        np.divide(one, s, out=s)
    tail = np.abs(x, out=scratch("tail", x.shape, np.float64), dtype=np.float64)
    np.negative(tail, out=tail)
    np.exp(tail, out=tail)
    np.log1p(tail, out=tail)
    loss = np.maximum(x, np.float32(0), out=scratch("loss", x.shape, np.float32))
    if index_targets:
        labels = cpu_kernels.view(target).reshape(-1)
        rows = np.flatnonzero((labels >= 0) & (labels < x.shape[1]))
        columns = labels[rows]
        s[rows, columns] -= one
        loss[rows, columns] -= x[rows, columns]
        valid = _float32(label_weight).reshape(-1, 1) > 0
        tot = max(int(np.count_nonzero(valid)) * x.shape[1], 1)
    else:
        t = _float32(target)
        np.subtract(s, t, out=s)
        loss -= x * t
        valid = _float32(label_weight) > 0
        tot = max(int(np.count_nonzero(valid)), 1)
    np.add(loss, tail, out=loss, casting="same_kind")
    return Arrays(s, gradient, loss, ~valid, np.float32(tot))


def ghmr_arrays(pred: paddle.Tensor, target: paddle.Tensor, label_weight: paddle.Tensor,
                mu: float, scratch: Scratch) -> Arrays:
    """GHM-R's arrays, for a float32 ``pred - target`` (`ghm_inputs.difference_dtype`).

    Args:
        pred: (N, 4) float32 deltas (any shape).
        target: targets broadcastable to ``pred`` (an integer or float32 dtype).
        label_weight: weights shaped like ``pred``, of any real or bool dtype.
    """
    values = cpu_kernels.view(pred.detach())
    target = cpu_kernels.view(target).astype(np.float32, copy=False)
    gradient = paddle.empty(pred.shape, dtype=pred.dtype)
    d = cpu_kernels.view(gradient)
    loss = scratch("loss", d.shape, np.float32)
    asl1_into(values, target, np.float32, mu, d, loss)
    weights = cpu_kernels.view(label_weight)
    tot = np.maximum(weights.astype(np.float32, copy=False).sum(dtype=np.float32), np.float32(1))
    with np.errstate(invalid="ignore"):
        invalid = ~(weights > 0)
    return Arrays(d, gradient, loss, invalid, tot)


def byte_ids(g: np.ndarray, invalid: np.ndarray, bins: int, scratch: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """`gradient_density.byte_regions` of float32 norms ``g`` (overwritten).

    ``fl32(g * bins)`` truncated, with the excluded id ``bins + 1`` for the
    invalid elements, NaN and anything past the last region (``fmin`` maps
    NaN to it, where the histogram of the chunked path leaves NaN out: either
    way it is counted in no region and weighted by zero).

    Returns:
        ids: uint8 shaped like ``g``; counts: (>= bins + 2,) int64.
    """
    excluded = np.float32(bins + 1)
    np.multiply(g, np.float32(bins), out=g)
    if invalid.shape == g.shape[:1] + (1,):
        # Per-row weights (index targets): the few ignored rows, not a mask pass.
        g[np.flatnonzero(invalid)] = excluded
    else:
        np.copyto(g, excluded, where=invalid)
    np.fmin(g, excluded, out=g)
    ids = scratch("ids", g.shape, np.uint8)
    np.copyto(ids, g, casting="unsafe")
    return ids, np.bincount(ids.reshape(-1), minlength=bins + 2)


def weighted_loss(arrays: Arrays, weights: np.ndarray, mean: bool, run: int, weigh_derivative: bool) -> paddle.Tensor:
    """The weighted loss, and the derivative weighted in place (it becomes the gradient).

    Args:
        weights: float32 per element, shaped like the loss.
        weigh_derivative: whether to weigh the derivative (a gradient is wanted).
        mean: sum the products (runs of ``run`` elements in float32, the runs
            in float64, as the chunked path does), else keep them.
    Returns:
        () float32 sum for ``mean``, else the products shaped like the prediction.
    """
    loss = arrays.loss
    np.multiply(loss, weights, out=loss)
    if weigh_derivative:
        np.multiply(arrays.derivative, weights, out=arrays.derivative)
    if not mean:
        return paddle.to_tensor(loss.reshape(arrays.gradient.shape))
    width = math.gcd(loss.size, run)
    runs = loss.reshape(-1, width) @ np.ones(width, np.float32)
    return paddle.to_tensor(runs.sum(dtype=np.float64).astype(np.float32))

