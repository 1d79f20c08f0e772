"""Pairwise IoU / IoF between two sets of ``(x1, y1, x2, y2)`` boxes, as mmdet computes it."""
from __future__ import annotations

import paddle


def bbox_overlaps(
    boxes1: paddle.Tensor, boxes2: paddle.Tensor, mode: str = "iou", eps: float = 1e-6
) -> paddle.Tensor:
    """Overlap of every box in ``boxes1`` with every box in ``boxes2``.

    Areas are ``(x2 - x1) * (y2 - y1)`` (no +1). ``iou`` divides the
    intersection by the union, ``iof`` by the area of the ``boxes1`` box; the
    denominator is clamped to at least ``eps``, so degenerate boxes give 0
    rather than NaN.

    Args:
        boxes1: ``(..., N, 4)``.
        boxes2: ``(..., M, 4)``; leading dims broadcast against ``boxes1``'s.
        mode: ``"iou"`` or ``"iof"``.
        eps: lower bound of the denominator.

    Returns:
        ``(..., N, M)`` overlaps, in ``boxes1``'s dtype.
    """
    if mode not in ("iou", "iof"):
        raise ValueError(f"mode must be 'iou' or 'iof', got {mode!r}")
    assert boxes1.shape[-1] == 4 and boxes2.shape[-1] == 4, "boxes are (..., 4)"

    # (..., N, 1) against (..., 1, M). Working per coordinate instead of on
    # (..., N, M, 2) corner tensors halves the peak memory of the large
    # anchors x ground-truths case; the arithmetic is the same.
    ax1, ay1, ax2, ay2 = (boxes1[..., i].unsqueeze(-1) for i in range(4))
    bx1, by1, bx2, by2 = (boxes2[..., i].unsqueeze(-2) for i in range(4))

    inter_w = (paddle.minimum(ax2, bx2) - paddle.maximum(ax1, bx1)).clip(min=0)
    inter_h = (paddle.minimum(ay2, by2) - paddle.maximum(ay1, by1)).clip(min=0)
    overlap = inter_w * inter_h

    area1 = (ax2 - ax1) * (ay2 - ay1)
    if mode == "iou":
        area2 = (bx2 - bx1) * (by2 - by1)
        union = area1 + area2 - overlap
    else:
        union = area1
    union = union.clip(min=eps)
    if overlap.dtype == paddle.float32:
        # Paddle's CPU float32 division is within one ulp, not correctly rounded, on
        # some CPUs (MKL's vectorized kernel), which moves IoUs that sit on an
        # assignment threshold. A float32 quotient computed in float64 and rounded
        # once is the correctly rounded one, as torch's division gives.
        return (overlap.astype("float64") / union.astype("float64")).astype("float32")
    return overlap / union
