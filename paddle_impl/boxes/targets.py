"""Training targets of every anchor of a batch, as mmdet's ``AnchorHead.get_targets``.

For each image: its valid anchors (inside its own padded shape) are assigned
by max IoU (``MaxIoUAssigner``; mmdet's PseudoSampler keeps every assignment),
positives regress to their ground truth (``DeltaXYWHBBoxCoder.encode``),
positives and negatives get classification weight 1, ignored and invalid
anchors weight 0. The whole batch is assigned in one pass of tensor ops; the
results are then split per FPN level, which is how the loss consumes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import paddle

from paddle_impl.boxes.anchors import AnchorGenerator
from paddle_impl.boxes.assigner import MaxIoUAssigner
from paddle_impl.boxes.box_coder import DeltaXYWHBBoxCoder
from paddle_impl.config import get_config


@dataclass
class LevelTargets:
    """Targets of one FPN level for a batch of B images and A_l anchors per image.

    Attributes:
        labels: ``(B, A_l)`` int64 class, ``num_classes`` for background.
        label_weights: ``(B, A_l)`` float32, 1 for positives and negatives.
        bbox_targets: ``(B, A_l, 4)`` float32 deltas, zero except positives.
        bbox_weights: ``(B, A_l, 4)`` float32, 1 for positives.
    """

    labels: paddle.Tensor
    label_weights: paddle.Tensor
    bbox_targets: paddle.Tensor
    bbox_weights: paddle.Tensor


@dataclass
class BatchTargets:
    """Per-level targets plus what they were built from.

    Attributes:
        levels: one :class:`LevelTargets` per FPN level.
        anchors: per level ``(A_l, 4)`` (identical for every image).
        num_pos: ``(B,)`` int64 positives per image.
        gt_inds: ``(B, A)`` int64 assignment over all levels (0 background,
            -1 ignored or invalid, ``j + 1`` ground truth ``j``).
    """

    levels: list[LevelTargets]
    anchors: list[paddle.Tensor]
    num_pos: paddle.Tensor
    gt_inds: paddle.Tensor


def pad_ground_truth(gt_bboxes: Sequence, gt_labels: Sequence):
    """Stack per-image ground truths into padded tensors.

    Args:
        gt_bboxes: per image ``(G_i, 4)`` boxes (x1, y1, x2, y2), array-like or tensors.
        gt_labels: per image ``(G_i,)`` class indices.

    Returns:
        ``(B, G, 4)`` float32 boxes, ``(B, G)`` int64 labels and ``(B, G)``
        bool mask of the real boxes, with ``G = max(1, max G_i)``.
    """
    counts = [int(np.shape(b)[0]) for b in gt_bboxes]
    g = max([1] + counts)
    boxes = np.zeros((len(counts), g, 4), np.float32)
    labels = np.zeros((len(counts), g), np.int64)
    mask = np.zeros((len(counts), g), bool)
    for i, (b, l) in enumerate(zip(gt_bboxes, gt_labels)):
        b = b.numpy() if isinstance(b, paddle.Tensor) else np.asarray(b, np.float32)
        l = l.numpy() if isinstance(l, paddle.Tensor) else np.asarray(l, np.int64)
        n = counts[i]
        if n:
            boxes[i, :n] = b.reshape(n, 4)
            labels[i, :n] = l.reshape(n)
            mask[i, :n] = True
    return paddle.to_tensor(boxes), paddle.to_tensor(labels), paddle.to_tensor(mask)


class AnchorTargetBuilder:
    """Anchors, valid flags, assignment and encoded targets for a batch."""

    def __init__(self, anchor_generator: AnchorGenerator, assigner: MaxIoUAssigner,
                 bbox_coder: DeltaXYWHBBoxCoder, num_classes: int):
        self.anchor_generator = anchor_generator
        self.assigner = assigner
        self.bbox_coder = bbox_coder
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg: dict | None = None) -> "AnchorTargetBuilder":
        cfg = get_config() if cfg is None else cfg
        return cls(AnchorGenerator.from_config(cfg), MaxIoUAssigner.from_config(cfg),
                   DeltaXYWHBBoxCoder.from_config(cfg), cfg["bbox_head"]["num_classes"])

    def __call__(self, featmap_sizes: Sequence[Sequence[int]], gt_bboxes: Sequence,
                 gt_labels: Sequence, pad_shapes: Sequence[Sequence[int]]) -> BatchTargets:
        """Targets for a batch.

        Args:
            featmap_sizes: ``(H_l, W_l)`` per level.
            gt_bboxes: per image ``(G_i, 4)``; ``G_i`` may be 0.
            gt_labels: per image ``(G_i,)``.
            pad_shapes: per image its own padded ``(h, w)`` (mmdet's ``pad_shape``),
                which decides the valid anchors.
        """
        anchors = self.anchor_generator.grid_anchors(featmap_sizes)
        level_sizes = [int(a.shape[0]) for a in anchors]
        flat_anchors = paddle.concat(anchors, axis=0)
        valid = paddle.stack([
            paddle.concat(self.anchor_generator.valid_flags(featmap_sizes, shape), axis=0)
            for shape in pad_shapes])
        boxes, labels, gt_mask = pad_ground_truth(gt_bboxes, gt_labels)
        result = self.assigner.assign_batch(flat_anchors, boxes, gt_mask, labels, valid)

        pos = result.gt_inds > 0
        neg = paddle.logical_and(result.gt_inds == 0, valid)
        cls_labels = paddle.where(pos, result.labels, paddle.full_like(result.labels, self.num_classes))
        label_weights = paddle.logical_or(pos, neg).astype("float32")

        # Non-positives are encoded against themselves (all-zero deltas), so
        # padding boxes never enter the log of the width ratio.
        matched = paddle.take_along_axis(
            boxes, paddle.clip(result.gt_inds - 1, min=0).unsqueeze(-1).expand(
                [boxes.shape[0], flat_anchors.shape[0], 4]), axis=1)
        batch_anchors = flat_anchors.unsqueeze(0).expand_as(matched)
        pos4 = pos.unsqueeze(-1).expand_as(matched)
        matched = paddle.where(pos4, matched, batch_anchors)
        bbox_weights = pos4.astype("float32")
        bbox_targets = self.bbox_coder.encode(batch_anchors, matched) * bbox_weights

        levels = []
        for lab, lw, bt, bw in zip(paddle.split(cls_labels, level_sizes, axis=1),
                                   paddle.split(label_weights, level_sizes, axis=1),
                                   paddle.split(bbox_targets, level_sizes, axis=1),
                                   paddle.split(bbox_weights, level_sizes, axis=1)):
            levels.append(LevelTargets(lab, lw, bt, bw))
        return BatchTargets(levels, anchors, pos.astype("int64").sum(axis=1), result.gt_inds)
