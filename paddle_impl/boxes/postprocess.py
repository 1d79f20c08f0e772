"""From head outputs to detections, as mmdet 3.3.0's RetinaHead predicts with ``rescale=True``.

This follows ``BaseDenseHead.predict_by_feat`` -> ``_predict_by_feat_single``
-> ``_bbox_post_process`` for a sigmoid classifier, image by image:

1. per level, ``scores = sigmoid(cls_score)`` laid out as ``(H*W*A, C)``
   (permute to ``(H, W, A*C)``, then reshape); every (anchor, class) pair
   scoring above ``score_thr`` is a candidate, and the ``nms_pre`` best of the
   level are kept, in descending score order;
2. the kept anchors of all levels are decoded together, clipped to the
   network input's ``img_shape``;
3. boxes are multiplied by ``1 / scale_factor`` (back to the original image);
4. boxes whose width or height is not above ``min_bbox_size`` are dropped;
5. class-wise NMS, then the ``max_per_img`` best by score.

Ties. mmdet sorts scores with ``torch.sort(descending=True)``, which on the
CPU is not stable beyond 16 elements (the order of equal scores is whatever
the introsort leaves). Here every sort is stable: equal scores keep their
input order (ascending (anchor, class) index within a level, level order after
concatenation). On real-valued scores this gives mmdet's results; where two
candidates have exactly equal scores and the tie decides something (the
``nms_pre`` cut, which of two overlapping same-class boxes NMS keeps, the
``max_per_img`` cut, the output order) the two may differ. Paddle's sigmoid
and torch's also differ by up to one float32 ulp on some inputs, so a score
within an ulp of ``score_thr`` or of another score can fall differently too.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import paddle
import paddle.nn.functional as F

from paddle_impl.boxes.anchors import AnchorGenerator
from paddle_impl.boxes.box_coder import DeltaXYWHBBoxCoder
from paddle_impl.config import get_config


class Detections(NamedTuple):
    """One image's detections, best score first.

    bboxes: ``(K, 4)`` float32 ``(x1, y1, x2, y2)`` in original image pixels.
    scores: ``(K,)`` float32 class probabilities.
    labels: ``(K,)`` int64 class indices in ``[0, C)``.
    """

    bboxes: paddle.Tensor
    scores: paddle.Tensor
    labels: paddle.Tensor


def filter_scores_and_topk(
    scores: paddle.Tensor, score_thr: float, topk: int
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """The ``topk`` best (anchor, class) pairs scoring above ``score_thr``.

    Args:
        scores: ``(N, C)`` float32 probabilities of N anchors.
        score_thr: a pair is a candidate when its score is strictly above this
            (compared in float32, as torch compares a tensor with a scalar).
        topk: most pairs kept; must be positive.

    Returns:
        ``(scores (K,), labels (K,), anchor_idxs (K,))`` with ``K <= topk``,
        in descending score order, equal scores in ascending
        ``anchor * C + class`` order.
    """
    assert topk > 0, "nms_pre must be positive"
    num_classes = scores.shape[1]
    flat = scores.reshape([-1])
    # nonzero lists the candidates in row-major (anchor, class) order, the
    # order torch.nonzero gives mmdet; a stable sort keeps it among ties.
    candidates = paddle.nonzero(flat > score_thr).reshape([-1])
    candidate_scores = paddle.gather(flat, candidates)
    order = paddle.argsort(candidate_scores, descending=True, stable=True)[:topk]
    picked = paddle.gather(candidates, order)
    return paddle.gather(candidate_scores, order), picked % num_classes, picked // num_classes


def batched_nms(
    boxes: paddle.Tensor, scores: paddle.Tensor, labels: paddle.Tensor, iou_threshold: float
) -> paddle.Tensor:
    """Class-wise greedy NMS, as ``mmcv.ops.batched_nms`` with ``type='nms'``.

    A box is suppressed by a better-scoring kept box of the same label when
    their IoU is strictly above ``iou_threshold``; widths are ``x2 - x1``
    (mmcv 2.x's offset 0). As in mmcv, labels are separated by shifting each
    box by ``label * (max coordinate + 1)`` in float32 and running one NMS
    over all boxes, so the IoUs are computed on those shifted float32
    coordinates, with the same rounding mmcv has.

    Args:
        boxes: ``(N, 4)`` float32 ``(x1, y1, x2, y2)``.
        scores: ``(N,)`` float32.
        labels: ``(N,)`` integer class of each box.
        iou_threshold: IoU above which the lower-scoring box is dropped.

    Returns:
        ``(K,)`` int64 indices of the kept boxes, in descending score order
        (equal scores in input order).
    """
    if boxes.shape[0] == 0:
        return paddle.zeros([0], dtype="int64")
    max_coordinate = boxes.max()
    offsets = labels.astype(boxes.dtype) * (max_coordinate + 1)
    boxes_for_nms = boxes + offsets.unsqueeze(1)
    order = paddle.argsort(scores, descending=True, stable=True)
    # Paddle's nms kernel, given boxes already in score order, is the same
    # greedy pass with the same float32 IoU as mmcv's CPU kernel; its own
    # score sort (when given scores) is not stable, so the sort is done here.
    kept = paddle.vision.ops.nms(paddle.gather(boxes_for_nms, order), iou_threshold)
    return paddle.gather(order, kept)


def _index(x: paddle.Tensor, idx: paddle.Tensor) -> paddle.Tensor:
    """Rows ``idx`` of ``x``; an empty ``idx`` gives an empty result of the row shape."""
    return paddle.gather(x, idx, axis=0)


def _predict_single(
    cls_scores: Sequence[paddle.Tensor],
    bbox_preds: Sequence[paddle.Tensor],
    anchors: Sequence[paddle.Tensor],
    num_base_anchors: Sequence[int],
    img_meta: dict,
    cfg: dict,
    bbox_coder: DeltaXYWHBBoxCoder,
    rescale: bool,
) -> Detections:
    """One image: ``cls_scores[l]`` ``(A*C, H, W)``, ``bbox_preds[l]`` ``(A*4, H, W)``,
    ``anchors[l]`` ``(H*W*A, 4)``."""
    level_scores, level_labels, level_deltas, level_anchors = [], [], [], []
    for cls_score, bbox_pred, level_anchors_all, num_anchors in zip(
        cls_scores, bbox_preds, anchors, num_base_anchors
    ):
        assert cls_score.shape[-2:] == bbox_pred.shape[-2:], "cls and bbox maps of one level differ"
        num_classes = cls_score.shape[0] // num_anchors
        probs = F.sigmoid(cls_score.transpose([1, 2, 0]).reshape([-1, num_classes]))
        deltas = bbox_pred.transpose([1, 2, 0]).reshape([-1, 4])
        scores, labels, anchor_idxs = filter_scores_and_topk(probs, cfg["score_thr"], cfg["nms_pre"])
        level_scores.append(scores)
        level_labels.append(labels)
        level_deltas.append(_index(deltas, anchor_idxs))
        level_anchors.append(_index(level_anchors_all, anchor_idxs))

    scores = paddle.concat(level_scores)
    labels = paddle.concat(level_labels)
    bboxes = bbox_coder.decode(
        paddle.concat(level_anchors), paddle.concat(level_deltas), max_shape=img_meta["img_shape"]
    )

    if rescale:
        # mmdet multiplies by the float32 reciprocal rather than dividing,
        # which can round differently in the last bit.
        w_scale, h_scale = img_meta["scale_factor"]
        inv_scale = paddle.to_tensor([1 / w_scale, 1 / h_scale] * 2, dtype="float32")
        bboxes = bboxes * inv_scale

    min_bbox_size = cfg.get("min_bbox_size", -1)
    if min_bbox_size >= 0:
        widths = bboxes[:, 2] - bboxes[:, 0]
        heights = bboxes[:, 3] - bboxes[:, 1]
        keep = paddle.nonzero((widths > min_bbox_size) & (heights > min_bbox_size)).reshape([-1])
        bboxes, scores, labels = _index(bboxes, keep), _index(scores, keep), _index(labels, keep)

    if bboxes.shape[0] > 0:
        keep = batched_nms(bboxes, scores, labels, cfg["nms_iou_threshold"])[: cfg["max_per_img"]]
        bboxes, scores, labels = _index(bboxes, keep), _index(scores, keep), _index(labels, keep)
    return Detections(bboxes=bboxes, scores=scores, labels=labels)


def predict_boxes(
    cls_scores: Sequence[paddle.Tensor],
    bbox_preds: Sequence[paddle.Tensor],
    img_metas: Sequence[dict],
    cfg: dict[str, Any] | None = None,
    rescale: bool = True,
    anchor_generator: AnchorGenerator | None = None,
    bbox_coder: DeltaXYWHBBoxCoder | None = None,
) -> list[Detections]:
    """Detections of a batch from the head's raw outputs.

    Args:
        cls_scores: per level ``(N, A*C, H_l, W_l)`` classification logits.
        bbox_preds: per level ``(N, A*4, H_l, W_l)`` box deltas.
        img_metas: per image a dict with ``img_shape`` ``(h, w)`` of the
            resized image inside the network input (boxes are clipped to it)
            and ``scale_factor`` ``(w_scale, h_scale)`` from the original
            image to ``img_shape`` (needed when ``rescale``).
        cfg: test configuration with ``nms_pre``, ``score_thr``,
            ``min_bbox_size``, ``nms_iou_threshold``, ``max_per_img``
            (default: ``get_config()['test_cfg']``).
        rescale: map the boxes back to the original image.
        anchor_generator, bbox_coder: defaults built from :func:`get_config`.

    Returns:
        One :class:`Detections` per image; boxes in original image pixels
        when ``rescale``, else in ``img_shape`` pixels.
    """
    assert len(cls_scores) == len(bbox_preds), "one bbox map per cls map"
    cfg = get_config()["test_cfg"] if cfg is None else cfg
    anchor_generator = anchor_generator or AnchorGenerator.from_config()
    bbox_coder = bbox_coder or DeltaXYWHBBoxCoder.from_config()
    assert len(cls_scores) == anchor_generator.num_levels, "one map per anchor level"

    with paddle.no_grad():
        anchors = anchor_generator.grid_anchors([s.shape[-2:] for s in cls_scores])
        return [
            _predict_single(
                [s[i] for s in cls_scores],
                [p[i] for p in bbox_preds],
                anchors,
                anchor_generator.num_base_anchors,
                img_meta,
                cfg,
                bbox_coder,
                rescale,
            )
            for i, img_meta in enumerate(img_metas)
        ]
