"""The GHM RetinaNet's rounding-level causes of divergence, as `align.engine.divergence` explanations.

- ReLU mask flips (`relu_flips`, the engine's): a pre-activation within rounding of zero is
  positive in one framework and not in the other; the element's gradient then
  passes in one and is blocked in the other. Forward values move by the
  element's own tiny magnitude only: it explains gradients (and the state the
  update writes), not losses, in its own step.
- GHM bin flips (`BinFlips`): an element's gradient length g within rounding of
  a bin edge is counted in different bins; the weights of both bins change,
  and so do the losses, the gradients and ``acc_sum``.

Row kinds (`row_kind`): ``loss`` (loss terms), ``gradient`` (gradients and
their norm), ``state`` (parameters, momentum, ``acc_sum`` after an update),
``lr``. A learning-rate disagreement has no rounding-level cause.
"""
from __future__ import annotations

import numpy as np

from align.engine.divergence import RELU_SCOPE, ROUNDING_SPACINGS, Explanation, relu_flips
from align.ghm.pair import LEVELS

__all__ = ["BIN_SCOPE", "RELU_SCOPE", "BinFlips", "relu_flips", "row_kind", "ulps_apart"]

BIN_SCOPE = frozenset({"loss", "gradient", "state"})


def row_kind(name: str) -> str:
    """The kind of a backward or train stage row (see the module docstring)."""
    head, _, rest = name.partition(".")
    if head in ("grad",) or rest == "grad_norm":
        return "gradient"
    if head in ("param", "momentum", "ghm"):
        return "state"
    if rest == "lr":
        return "lr"
    return "loss"


def ulps_apart(a, b) -> int:
    """How many representable numbers of ``a``'s float type lie between ``a`` and ``b`` (non-negative)."""
    kind = np.asarray(a).dtype
    ints = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}[kind]
    x, y = (np.asarray(v, kind).view(ints).astype(np.int64) for v in (a, b))
    return int(abs(int(x) - int(y)))


class BinFlips:
    """Per step, the GHM calls whose bin counts differ between mmdet and Paddle, and the elements
    that moved, from recorders made with ``keep_g`` (``{"ghmc": (torch, paddle), "ghmr": ...}``)."""

    def __init__(self, recorders: dict, most: int = 5):
        self.recorders = recorders
        self.most = most

    def explanation(self, step: int) -> Explanation | None:
        """The flips of step ``step`` (1-based; one call per level and loss); clears the kept g."""
        lines, total = [], 0
        first = (step - 1) * len(LEVELS)
        for kind, (t_rec, p_rec) in self.recorders.items():
            for call in range(first, min(first + len(LEVELS), len(t_rec.counts), len(p_rec.counts))):
                if np.array_equal(t_rec.counts[call], p_rec.counts[call]):
                    continue
                near, line = self._elements(t_rec, p_rec, call)
                total += near
                lines.append(f"{kind} {LEVELS[call % len(LEVELS)]}: {line}")
        for t_rec, p_rec in self.recorders.values():
            t_rec.clear_g()
            p_rec.clear_g()
        if not total:
            return None
        return Explanation("GHM bin flip", total, "; ".join(lines), BIN_SCOPE)

    def _elements(self, t_rec, p_rec, call: int) -> tuple[int, str]:
        """``(elements within rounding of an edge, description)`` of one call whose counts differ.
        Without the recorded g the elements are not known: every moved one is counted."""
        bins = np.flatnonzero(t_rec.counts[call] != p_rec.counts[call]).tolist()
        if call not in t_rec.g or call not in p_rec.g:
            moved = int(np.abs(t_rec.counts[call] - p_rec.counts[call]).sum() // 2)
            return moved, f"bins {bins} differ"
        (g_t, valid_t), (g_p, valid_p) = t_rec.g[call], p_rec.g[call]
        edges = t_rec.edges().astype(g_t.dtype)
        bin_t = np.where(valid_t, np.searchsorted(edges, g_t, side="right") - 1, -1)
        bin_p = np.where(valid_p, np.searchsorted(edges, g_p.astype(g_t.dtype), side="right") - 1, -1)
        where = np.flatnonzero((bin_t != bin_p).reshape(-1))
        flat_t = g_t.reshape(-1)[where]
        nearest = edges[np.abs(edges[None, :] - flat_t[:, None]).argmin(axis=1)] if where.size else edges[:0]
        near = sum(ulps_apart(g, e) <= ROUNDING_SPACINGS for g, e in zip(flat_t, nearest))
        parts = []
        for index in where[: self.most]:
            gt, gp = g_t.reshape(-1)[index], g_p.reshape(-1)[index]
            edge = edges[np.argmin(np.abs(edges - gt))]
            ulps = ulps_apart(gt, edge)
            parts.append(f"g {float(gt):.9g} (mmdet, bin {int(bin_t.reshape(-1)[index])}) vs {float(gp):.9g} "
                         f"(paddle, bin {int(bin_p.reshape(-1)[index])}), {ulps} ulps from edge {float(edge):.9g}")
        more = f" and {len(where) - self.most} more" if len(where) > self.most else ""
        return near, (f"{len(where)} elements in bins {bins} ({near} within {ROUNDING_SPACINGS} ulps of an edge): "
                      + "; ".join(parts) + more)
