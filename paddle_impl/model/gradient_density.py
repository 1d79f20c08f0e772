"""The gradient density of the GHM losses: regions of the gradient norm and their weights.

The gradient norm ``g`` of an element lies in [0, 1]; ``bins`` regions cut
that range at float32 edges computed as mmdet 3.3.0 computes them, and an
element is in region ``i`` when ``edges[i] <= g < edges[i + 1]`` and its label
weight is positive. The weight of an element is ``tot`` over the (running)
count of its region, divided by the number of non-empty regions.

Region ids: 0 .. bins-1 are the regions; ``bins`` is an alias of the last
region (the fast bucketing puts g == 1 there), ``bins + 1`` collects the
elements that are in no region (label weight <= 0, NaN, g >= the last edge).
One ``bincount`` of the ids and one look-up in a (bins + 2,) table replace
mmdet's loop over the regions and its host synchronisation in each.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import paddle

__all__ = ["EDGE_CHECK_ULPS", "bin_edges", "truncation_is_exact", "region_ids", "density_weights"]

# How far around each edge (in float32 units in the last place) the fast
# bucketing is checked against the exact comparisons; see `truncation_is_exact`.
EDGE_CHECK_ULPS = 16


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


def density_weights(ids: paddle.Tensor, tot: paddle.Tensor, bins: int, momentum: float = 0.0,
                    acc_sum: Optional[paddle.Tensor] = None) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Per-element GHM weights from this call's region counts or, with momentum,
    from the running counts ``acc_sum``, which are updated in place.

    Args:
        ids: (...) int32 region ids from `region_ids`.
        tot: () the normaliser ``tot`` of the call, in the dtype of the
            weights to return (the loss's computation dtype).
        bins: the number of regions.
        momentum: moving-average factor of the counts (0: none).
        acc_sum: (bins,) running region counts, float32 or float64; required
            when momentum > 0 and unused otherwise. Only the non-empty
            regions of this call are updated.
    Returns:
        weights: (...) in ``tot``'s dtype, zero for excluded elements.
        counts: (bins,) int64 region counts of this call.
    """
    if momentum > 0 and acc_sum is None:
        raise ValueError(f"momentum {momentum} needs the running counts acc_sum")
    counts = paddle.bincount(ids.reshape([-1]), minlength=bins + 2)
    # Fold the alias of the last region into it; drop the excluded id.
    counts = paddle.concat([counts[:bins - 1], counts[bins - 1:bins + 1].sum(keepdim=True)])
    nonempty = counts > 0
    counts64 = counts.astype("float64")
    dtype = tot.dtype
    if momentum > 0:
        # mmdet: acc = mmt * acc + (1 - mmt) * num with the first product
        # in the buffer's dtype and the second in double, then tot / acc
        # evaluated as reciprocal(acc) * tot in the buffer's dtype; the
        # result is stored into the weights (the computation dtype).
        acc_dtype = acc_sum.dtype
        decayed = acc_sum * paddle.full([1], momentum, dtype=acc_dtype)
        fresh = (counts64 * (1.0 - momentum)).astype(acc_dtype)
        acc = paddle.where(nonempty, decayed + fresh, acc_sum)
        paddle.assign(acc, output=acc_sum)
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
    return paddle.gather(table, ids.reshape([-1])).reshape(ids.shape), counts
