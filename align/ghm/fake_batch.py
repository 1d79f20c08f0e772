"""The loss stage's default fake batch: two images, one of them without boxes.

Image 0 fills the batch (800x1344) and has a large box, a small box and a box
touching the right border; image 1 is narrower (its own padded width leaves
anchors outside it, which must get weight 0) and has no boxes at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FakeBatch:
    """Ground truth and image geometry of a batch.

    Attributes:
        batch_shape: ``(H, W)`` of the padded batch tensor.
        img_shapes: per image ``(h, w)`` after resizing.
        pad_shapes: per image ``(h, w)`` padded to a multiple of 32.
        gt_bboxes: per image ``(G_i, 4)`` float32 (x1, y1, x2, y2).
        gt_labels: per image ``(G_i,)`` int64.
    """

    batch_shape: tuple[int, int]
    img_shapes: list[tuple[int, int]]
    pad_shapes: list[tuple[int, int]] = field(default_factory=list)
    gt_bboxes: list[np.ndarray] = field(default_factory=list)
    gt_labels: list[np.ndarray] = field(default_factory=list)


def pad_to(size: int, divisor: int = 32) -> int:
    return -(-size // divisor) * divisor


def default_batch(batch_shape: tuple[int, int] = (800, 1344)) -> FakeBatch:
    """Two images in a ``batch_shape`` batch; box coordinates scale with it."""
    h, w = batch_shape
    narrow_w = max(32, pad_to(int(w * 0.9)) - 32)
    sy, sx = h / 800.0, w / 1344.0
    boxes0 = np.array([
        [100 * sx, 80 * sy, 900 * sx, 700 * sy],      # large
        [600 * sx, 300 * sy, 624 * sx, 318 * sy],     # small (24 x 18 px at full size)
        [1200 * sx, 200 * sy, w - 1.0, 420 * sy],     # touching the right border
    ], np.float32)
    labels0 = np.array([0, 17, 56], np.int64)
    img_shapes = [(h, w), (h, narrow_w - 7)]
    return FakeBatch(
        batch_shape=(h, w),
        img_shapes=img_shapes,
        pad_shapes=[(pad_to(a), pad_to(b)) for a, b in img_shapes],
        gt_bboxes=[boxes0, np.zeros((0, 4), np.float32)],
        gt_labels=[labels0, np.zeros((0,), np.int64)],
    )


def random_batch(batch_shape: tuple[int, int], seed: int, num_images: int = 2,
                 empty_image: bool = False) -> FakeBatch:
    """A seeded batch of ``num_images`` with 1-4 random boxes each.

    The last image is narrower than the batch (its own padded width is
    smaller), and has no boxes when ``empty_image``.
    """
    rng = np.random.default_rng(seed)
    h, w = batch_shape
    img_shapes = [(h, w)] * (num_images - 1) + [(h, max(32, w - 40))]
    boxes, labels = [], []
    for i, (ih, iw) in enumerate(img_shapes):
        n = 0 if (empty_image and i == num_images - 1) else int(rng.integers(1, 5))
        size = rng.uniform(16, min(ih, iw) / 2, size=(n, 2))
        x1 = rng.uniform(0, iw - size[:, 0])
        y1 = rng.uniform(0, ih - size[:, 1])
        boxes.append(np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], 1).astype(np.float32))
        labels.append(rng.integers(0, 80, n).astype(np.int64))
    return FakeBatch(batch_shape=(h, w), img_shapes=img_shapes,
                     pad_shapes=[(pad_to(a), pad_to(b)) for a, b in img_shapes],
                     gt_bboxes=boxes, gt_labels=labels)
