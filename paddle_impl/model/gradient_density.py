"""The gradient density of the GHM losses: regions of the gradient norm and their weights.

The gradient norm ``g`` of an element lies in [0, 1]; ``bins`` regions cut
that range at float32 edges computed as mmdet 3.3.0 computes them, and an
element is in region ``i`` when ``edges[i] <= g < edges[i + 1]`` and its label
weight is positive. The weight of an element is ``tot`` over the (running)
count of its region, divided by the number of non-empty regions.

Region ids: 0 .. bins-1 are the regions; ``bins`` is an alias of the last
region (the truncation puts g == 1 there), ``bins + 1`` marks the elements
that are in no region (label weight <= 0, NaN, g >= the last edge). Counting
the ids once and looking each element's weight up in a small table replace
mmdet's loop over the regions and its host synchronisation in each.

Two bucketings give the same ids:

* `region_ids`, int32 ids for any dtype and bin count: the truncation
  ``int(fl32(g * bins))`` where it is exact (`truncation_is_exact`), else
  ``searchsorted`` on the edges; ``bincount`` counts them.
* `byte_regions`, for float32 chunks when the truncation is exact and the ids
  fit in a byte: two or three in-place operations, a ``histogram`` of the scaled
  norms (which leaves NaN out of every region, as mmdet's comparisons do) and
  a cast to uint8. The loss works on cache-sized chunks, and there the
  fewer, in-place passes and the byte-sized ids are what make it fast.

`region_table` turns the counts into the per-id weight table (updating the
running counts with momentum).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import paddle

from paddle_impl.model import cpu_kernels

__all__ = ["EDGE_CHECK_ULPS", "BYTE_TABLE_SIZE", "bin_edges", "truncation_is_exact", "region_ids",
           "byte_regions_apply", "exclusion", "byte_regions", "region_table"]

# How far around each edge (in float32 units in the last place) the fast
# bucketing is checked against the exact comparisons; see `truncation_is_exact`.
EDGE_CHECK_ULPS = 16
# Entries of the weight table of `byte_regions`' ids: one per byte.
BYTE_TABLE_SIZE = 256


def bin_edges(bins: int, last_edge: Optional[float]) -> np.ndarray:
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


def truncation_is_exact(edges: np.ndarray, bins: int) -> bool:
    """Whether ``int(fl32(g * bins))`` gives the region of every g in [0, 1].

    Far from an edge the rounded product ``fl32(g * bins)`` cannot cross an
    integer, and both the float32 edge ``fl32(k / bins)`` and the rounding of
    the product move the boundary by at most about one unit in the last place
    of ``k / bins``. So the truncation and the exact comparisons can only
    disagree for g within a few units of some ``k / bins``; checking every
    float32 within `EDGE_CHECK_ULPS` of each of them settles the question.
    Whether it holds depends on ``bins``: it does for 10 and 30 (an exhaustive
    check over all float32 in [0, 1] agrees), not for 100.

    Args:
        edges: (bins + 1,) float32 edges from `bin_edges`.
        bins: the number of regions.
    """
    centres = np.arange(bins + 1, dtype=np.float32) / np.float32(bins)
    offsets = np.arange(-EDGE_CHECK_ULPS, EDGE_CHECK_ULPS + 1, dtype=np.int32)
    g = (centres.view(np.int32)[:, None] + offsets[None, :]).view(np.float32).ravel()
    g = g[(g >= 0) & (g <= 1)]
    exact = np.searchsorted(edges, g, side="right") - 1
    fast = np.minimum((g * np.float32(bins)).astype(np.int32), bins - 1)
    return bool(np.array_equal(exact, fast))


def region_ids(g: paddle.Tensor, valid: paddle.Tensor, edges: paddle.Tensor,
               fast: bool) -> paddle.Tensor:
    """Region id of every element; overwrites ``g``.

    Args:
        g: (...) float32 or float64 gradient norms in [0, 1] (or NaN), a
            scratch tensor this call may modify.
        valid: bool tensor broadcastable to ``g``: label weight > 0.
        edges: (bins + 1,) float32 (or float64) edges.
        fast: `truncation_is_exact` holds for these edges.
    Returns:
        (...) int32 ids in [0, bins + 1], see the module docstring.
    """
    bins = edges.shape[0] - 1
    excluded = float(bins + 1)
    # The truncation was checked against the edges for float32 g only: a
    # float64 g can fall between k / bins and its float32 edge.
    if fast and g.dtype == paddle.float32:
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
    if edges.dtype != g.dtype:
        edges = edges.astype(g.dtype)
    ids = paddle.searchsorted(edges, masked, right=True, out_int32=True) - 1
    return ids + (ids == bins).astype("int32")


def byte_regions_apply(bins: int, dtype) -> bool:
    """Whether `byte_regions` may bucket gradient norms of ``dtype`` into ``bins`` regions."""
    return dtype == paddle.float32 and bins + 1 < BYTE_TABLE_SIZE


def exclusion(valid: paddle.Tensor, broadcasts: bool, bins: int) -> tuple:
    """How `byte_regions` gives the elements in no region (label weight <= 0) the excluded id.

    Args:
        valid: bool, broadcastable to the gradient norms: label weight > 0.
        broadcasts: ``valid`` is smaller than the norms (an (N, 1) column of
            per-sample weights).
    Returns:
        for a ``valid`` that broadcasts, float32 ``(scale, offset)`` shaped
        like it: ``g * scale + offset`` is ``g * bins`` where valid and
        ``bins + 1`` elsewhere, two passes over the norms and nothing of
        their size made; else ``(invalid, bins + 1)``, a mask and the ()
        value of one masked fill.
    """
    if not broadcasts:
        return cpu_kernels.logical_not(valid), paddle.full([], float(bins + 1), dtype="float32")
    ones = valid.astype("float32")
    return paddle.scale(ones, float(bins)), paddle.scale(ones, -float(bins + 1), float(bins + 1))


def byte_regions(g: paddle.Tensor, excluded_by: tuple, bins: int,
                 bounded: bool = False) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Region ids and counts of float32 gradient norms by truncation; overwrites ``g``.

    For bin counts where `truncation_is_exact` holds and ``bins + 1 < 256``
    (`byte_regions_apply`). ``fl32(g * bins)`` is rounded as in `region_ids`
    (adding a zero offset keeps it); an invalid element becomes ``bins + 1``.
    The histogram's bins are unit intervals over [0, 2^k) (a power of two,
    so that its ``(v - min) * nbins / (max - min)`` is exactly ``v``), i.e.
    it counts ``int(v)`` as the cast does, and it leaves NaN out, as mmdet's
    comparisons leave a NaN norm out of every region. The cast gives a NaN
    some byte: every byte has an entry in a `BYTE_TABLE_SIZE` weight table,
    and the element's loss is NaN whatever its weight, as in mmdet.

    Args:
        g: (...) float32 gradient norms in [0, 1] (or NaN), a scratch tensor.
        excluded_by: `exclusion` of the label weights, broadcastable to ``g``.
        bins: the number of regions.
        bounded: ``g`` is at most 1 (up to rounding) or NaN, so that no
            scaled norm reaches ``bins + 1``; else larger ones are clipped
            to the excluded id (they are in no region, as in mmdet).
    Returns:
        ids: (...) uint8 ids (see the module docstring); NaN: any byte.
        counts: (>= bins + 2,) int64 counts of the ids 0, 1, ...
    """
    first, second = excluded_by
    if first.dtype == paddle.bool:
        g.scale_(float(bins))
        g.masked_fill_(first, second)
    else:
        g.multiply_(first)
        g.add_(second)
    if not bounded:
        g.clip_(max=float(bins + 1))
    span = 1 << (bins + 1).bit_length()
    counts = paddle.histogram(g, bins=span, min=0, max=span)
    return g.astype("uint8"), counts


def region_table(counts: np.ndarray, tot, bins: int, size: int, momentum: float = 0.0,
                 acc_sum: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The weight of each region id from this call's counts or, with momentum,
    from the running counts ``acc_sum``.

    A few dozen scalars: numpy computes them on the host, where an operation
    costs a microsecond, in the dtypes and the order of mmdet's operations.

    Args:
        counts: (>= bins + 1,) int64 counts of the ids 0 .. bins (what comes
            after is not counted: the excluded id).
        tot: numpy float32 or float64 scalar: the normaliser ``tot`` of the
            call, in the dtype of the weights (the loss's computation dtype).
        bins: the number of regions.
        size: entries of the table: ``bins + 2`` for `region_ids`,
            `BYTE_TABLE_SIZE` for `byte_regions`.
        momentum: moving-average factor of the counts (0: none).
        acc_sum: (bins,) float32 or float64 running region counts; required
            when momentum > 0 and unused otherwise.
    Returns:
        table: (size,) weights by id in ``tot``'s dtype: id ``bins`` has the
            last region's, every other id past the regions zero.
        region_counts: (bins,) int64 region counts of this call.
        acc_sum: the updated running counts (only the non-empty regions of
            this call change), or None without momentum.
    """
    if momentum > 0 and acc_sum is None:
        raise ValueError(f"momentum {momentum} needs the running counts acc_sum")
    dtype = tot.dtype.type
    # Fold the alias of the last region into it; drop the excluded id.
    region_counts = counts[:bins].astype(np.int64)
    region_counts[bins - 1] += counts[bins]
    nonempty = region_counts > 0
    if momentum > 0:
        # mmdet: acc = mmt * acc + (1 - mmt) * num with the first product
        # in the buffer's dtype and the second in double, then tot / acc
        # evaluated as reciprocal(acc) * tot in the buffer's dtype; the
        # result is stored into the weights (the computation dtype).
        acc_type = acc_sum.dtype.type
        acc_sum = acc_sum.copy()
        fresh = (region_counts[nonempty] * (1.0 - momentum)).astype(acc_type)
        acc_sum[nonempty] = acc_sum[nonempty] * acc_type(momentum) + fresh
        per_region = (acc_type(1) / acc_sum[nonempty] * acc_type(tot)).astype(dtype)
    else:
        # mmdet: tot / num in double, stored into the weights.
        per_region = (np.float64(tot) / region_counts[nonempty]).astype(dtype)
        acc_sum = None
    table = np.zeros(size, dtype)
    # Divide by the number of non-empty regions (with none, every weight is zero).
    table[:bins][nonempty] = per_region / dtype(max(int(nonempty.sum()), 1))
    table[bins] = table[bins - 1]
    return table, region_counts, acc_sum
