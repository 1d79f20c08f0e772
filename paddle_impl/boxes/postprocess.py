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

One implementation serves the dynamic graph (:func:`predict_boxes`) and the
exported program (:func:`detect`, traced by ``paddle.jit.to_static`` with the
batch size and the image size free). Until NMS every image has a fixed number
of candidate slots (``nms_pre`` per level) with a ``valid`` mask in place of a
selection of variable length; NMS then lists the kept boxes of all images one
after the other, with a count per image.

Ties. mmdet sorts scores with ``torch.sort(descending=True)``, which on the
CPU is not stable beyond 16 elements (the order of equal scores is whatever
the introsort leaves). Here every order is stable: equal scores keep their
input order (ascending (anchor, class) index within a level, level order after
concatenation), also at the ``nms_pre`` cut. On real-valued scores this gives
mmdet's results; where two candidates have exactly equal scores and the tie
decides something (the ``nms_pre`` cut, which of two overlapping same-class
boxes NMS keeps, the ``max_per_img`` cut, the output order) the two may
differ. Paddle's sigmoid and torch's also differ by up to one float32 ulp on
some inputs, so a score within an ulp of ``score_thr`` or of another score can
fall differently too.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import _C_ops

from paddle_impl.boxes.anchors import AnchorGenerator
from paddle_impl.boxes.box_coder import DeltaXYWHBBoxCoder
from paddle_impl.config import get_config

LOWEST_FLOAT32 = float(np.finfo(np.float32).min)


class Detections(NamedTuple):
    """One image's detections, best score first.

    bboxes: ``(K, 4)`` float32 ``(x1, y1, x2, y2)`` in original image pixels.
    scores: ``(K,)`` float32 class probabilities.
    labels: ``(K,)`` int64 class indices in ``[0, C)``.
    """

    bboxes: paddle.Tensor
    scores: paddle.Tensor
    labels: paddle.Tensor


def top_candidates(
    scores: paddle.Tensor, score_thr: float, k: int
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """The ``k`` best entries of each row of ``scores`` that are above ``score_thr``, in ``k`` fixed slots.

    Args:
        scores: ``(N, M)`` float32.
        score_thr: an entry is a candidate when strictly above this (in float32,
            as torch compares a tensor with a scalar).
        k: slots per row; must be positive.

    Returns:
        ``(scores (N, k), idxs (N, k) int64, valid (N, k) bool)``: slot ``j`` holds
        the ``j``-th best candidate of its row, equal scores in ascending index,
        the same as a stable descending sort of the candidates. Slots beyond a
        row's candidates are not valid (index 0, score ``-inf``).
    """
    assert k > 0, "nms_pre must be positive"
    # A one-element threshold broadcasts; a Python number would be expanded to the scores' size.
    candidate = paddle.greater_than(scores, paddle.full([1], score_thr, scores.dtype))
    # Only the candidates are sorted (usually a small share of the level), in
    # one stable sort on the key row * 4 - score: rows apart, within a row by
    # descending score, equal scores in index order (nonzero's). In float64 the
    # key holds the float32 score exactly for scores above 1e-6 in batches of
    # up to 64 images.
    where = paddle.nonzero(candidate)
    rows = where[:, 0]
    values = paddle.gather_nd(scores, where)
    order = paddle.argsort(rows.astype("float64") * 4 - values.astype("float64"), stable=True)
    # Sorted, row n's candidates start at first[n]: the row and the rank of each
    # sorted position follow from the counts, and only the k best of each row
    # are gathered (a gather of every candidate costs more than the sort).
    images = paddle.arange(paddle.shape(scores)[0], dtype="int64").unsqueeze(1)
    counts = (rows.unsqueeze(0) == images).astype("int64").sum(axis=1)
    first = paddle.cumsum(counts) - counts
    position = paddle.arange(paddle.shape(rows)[0], dtype="int64")
    row_at = (first.unsqueeze(1) <= position.unsqueeze(0)).astype("int64").sum(axis=0) - 1
    rank = position - paddle.gather(first, row_at)
    kept = paddle.nonzero(rank < k).reshape([-1])
    picked = paddle.gather(order, kept)
    slots = paddle.gather(row_at * k + rank, kept)
    values, cols = paddle.gather(values, picked), paddle.gather(where[:, 1], picked)
    empty = paddle.full_like(scores[:, :1], float("-inf")).tile([1, k]).reshape([-1])
    slot_scores = paddle.scatter(empty, slots, values)
    slot_idxs = paddle.scatter(paddle.zeros_like(empty, "int64"), slots, cols)
    slot_scores, slot_idxs = slot_scores.reshape([-1, k]), slot_idxs.reshape([-1, k])
    return slot_scores, slot_idxs, slot_scores > float("-inf")


def filter_scores_and_topk(
    scores: paddle.Tensor, score_thr: float, topk: int
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """The ``topk`` best (anchor, class) pairs scoring above ``score_thr`` (one
    image's :func:`top_candidates`, its valid slots only).

    Args:
        scores: ``(A, C)`` float32 probabilities of A anchors.
        score_thr, topk: as :func:`top_candidates`' ``score_thr`` and ``k``.

    Returns:
        ``(scores (K,), labels (K,), anchor_idxs (K,))`` with ``K <= topk``,
        in descending score order, equal scores in ascending
        ``anchor * C + class`` order.
    """
    num_classes = scores.shape[1]
    top, idxs, valid = top_candidates(scores.reshape([1, -1]), score_thr, topk)
    keep = paddle.nonzero(valid[0]).reshape([-1])
    picked = paddle.gather(idxs[0], keep)
    return paddle.gather(top[0], keep), picked % num_classes, picked // num_classes


def nms(
    bboxes: paddle.Tensor, scores: paddle.Tensor, labels: paddle.Tensor, valid: paddle.Tensor,
    iou_threshold: float, max_per_img: int,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Class-wise greedy NMS of each image, as ``mmcv.ops.batched_nms`` with
    ``type='nms'``, then its ``max_per_img`` best.

    A box is suppressed by a better-scoring kept box of the same label when
    their IoU is strictly above ``iou_threshold``; widths are ``x2 - x1``
    (mmcv 2.x's offset 0). As in mmcv, labels are separated by shifting each
    box by ``label * (max coordinate + 1)`` in float32 and running one NMS
    over all boxes of an image, so the IoUs are computed on those shifted
    float32 coordinates, with the same rounding mmcv has. Paddle's
    ``multiclass_nms3`` kernel, given one class, is that greedy pass with a
    stable score order (paddle2onnx turns it into ONNX's NonMaxSuppression).

    Args:
        bboxes: ``(N, M, 4)`` float32 ``(x1, y1, x2, y2)``.
        scores: ``(N, M)`` float32.
        labels: ``(N, M)`` integer class of each box.
        valid: ``(N, M)`` bool, the slots that hold a candidate.
        iou_threshold: IoU above which the lower-scoring box is dropped.
        max_per_img: most boxes kept per image.

    Returns:
        ``(index (K,) int64, num (N,) int64)``: the kept slots as indices into the
        ``(N * M)`` flattened candidates, image after image, each image's in
        descending score order (equal scores in slot order); ``num[i]`` of them
        belong to image ``i``.
    """
    slots = bboxes.shape[1]
    in_image = paddle.where(valid.unsqueeze(-1).tile([1, 1, 4]), bboxes, paddle.zeros_like(bboxes))
    max_coordinate = in_image.flatten(1).max(axis=1, keepdim=True)
    offsets = labels.astype(bboxes.dtype) * (max_coordinate + 1)
    boxes_for_nms = bboxes + offsets.unsqueeze(-1)
    # A box of zero width or height has IoU 0 (or 0/0) with every box in mmcv's
    # pass, so it neither suppresses nor is suppressed; Paddle's kernel would
    # drop one of two such boxes at 0/0. Each is moved to a point of its own,
    # apart from every other box.
    flat = boxes_for_nms.flatten(1)
    degenerate = ((boxes_for_nms[..., 2:] - boxes_for_nms[..., :2]) <= 0).any(axis=-1, keepdim=True)
    points = flat.min(axis=1, keepdim=True) - 1 - paddle.arange(slots, dtype=bboxes.dtype)
    boxes_for_nms = paddle.where(degenerate.tile([1, 1, 4]), points.unsqueeze(-1).tile([1, 1, 4]), boxes_for_nms)
    # The kernel takes scores above its threshold: every finite score is, -inf is not.
    scores_for_nms = paddle.where(valid, scores, paddle.full_like(scores, float("-inf"))).unsqueeze(1)
    # Keeping every slot (nms_top_k = keep_top_k = slots) leaves the kernel's
    # own, unstable, cut unused; max_per_img is cut below in NMS order.
    _, index, num = _C_ops.multiclass_nms3(boxes_for_nms, scores_for_nms, None, LOWEST_FLOAT32, slots, slots,
                                           iou_threshold, True, 1.0, -1)
    index = index.reshape([-1]).astype("int64")
    num = num.astype("int64")
    first = paddle.cumsum(num) - num
    rank = paddle.arange(paddle.shape(index)[0], dtype="int64") - paddle.gather(first, index // slots)
    keep = paddle.nonzero(rank < max_per_img).reshape([-1])
    return paddle.gather(index, keep), paddle.minimum(num, paddle.full_like(num, max_per_img))


def batched_nms(
    boxes: paddle.Tensor, scores: paddle.Tensor, labels: paddle.Tensor, iou_threshold: float
) -> paddle.Tensor:
    """One image's :func:`nms` with every box a candidate and no ``max_per_img`` cut.

    Args:
        boxes: ``(M, 4)`` float32 ``(x1, y1, x2, y2)``.
        scores: ``(M,)`` float32.
        labels: ``(M,)`` integer class of each box.
        iou_threshold: IoU above which the lower-scoring box is dropped.

    Returns:
        ``(K,)`` int64 indices of the kept boxes, in descending score order
        (equal scores in input order).
    """
    count = boxes.shape[0]
    if count == 0:
        return paddle.zeros([0], dtype="int64")
    index, _ = nms(boxes.unsqueeze(0), scores.unsqueeze(0), labels.unsqueeze(0),
                   paddle.ones([1, count], dtype="bool"), iou_threshold, count)
    return index


def detect(
    cls_scores: Sequence[paddle.Tensor],
    bbox_preds: Sequence[paddle.Tensor],
    img_shapes: paddle.Tensor,
    inv_scale_factors: paddle.Tensor,
    cfg: dict[str, Any],
    anchor_generator: AnchorGenerator,
    bbox_coder: DeltaXYWHBBoxCoder,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Detections of a batch, with no shape known ahead but the channels (traceable).

    Args:
        cls_scores: per level ``(N, A*C, H_l, W_l)`` classification logits.
        bbox_preds: per level ``(N, A*4, H_l, W_l)`` box deltas.
        img_shapes: ``(N, 2)`` float32 ``(h, w)`` of each resized image inside
            the network input; boxes are clipped to it.
        inv_scale_factors: ``(N, 2)`` float32 ``(1 / w_scale, 1 / h_scale)``,
            each reciprocal taken in float64 and rounded once, as mmdet's
            ``1 / s`` in Python; boxes are multiplied by it (ones: no rescale).
        cfg: test configuration (see :func:`predict_boxes`).

    Returns:
        ``(bboxes (K, 4), scores (K,), labels (K,) int64, num (N,) int64)``: the
        detections of all images one after the other, each image's best first;
        the first ``num[0]`` belong to image 0, and so on.
    """
    levels = []
    for level, (cls_score, bbox_pred) in enumerate(zip(cls_scores, bbox_preds)):
        num_classes = cls_score.shape[1] // anchor_generator.num_base_anchors[level]
        probs = F.sigmoid(cls_score.transpose([0, 2, 3, 1]).flatten(1))
        scores, idxs, valid = top_candidates(probs, cfg["score_thr"], cfg["nms_pre"])
        anchor_idxs = idxs // num_classes
        deltas = bbox_pred.transpose([0, 2, 3, 1]).reshape([0, -1, 4])
        deltas = paddle.take_along_axis(deltas, anchor_idxs.unsqueeze(-1).tile([1, 1, 4]), axis=1)
        anchors = anchor_generator.anchors_at(level, anchor_idxs, paddle.shape(cls_score)[3].astype("int64"))
        levels.append((scores, idxs % num_classes, valid, anchors, deltas))
    scores, labels, valid, anchors, deltas = (paddle.concat(parts, axis=1) for parts in zip(*levels))

    bboxes = bbox_coder.decode(anchors, deltas, max_shape=img_shapes)
    # mmdet multiplies by the float32 reciprocal rather than dividing, which
    # can round differently in the last bit.
    bboxes = bboxes * inv_scale_factors.tile([1, 2]).unsqueeze(1)

    min_bbox_size = cfg.get("min_bbox_size", -1)
    if min_bbox_size >= 0:
        sizes = bboxes[..., 2:] - bboxes[..., :2]
        valid = valid & (sizes > min_bbox_size).all(axis=-1)

    index, num = nms(bboxes, scores, labels, valid, cfg["nms_iou_threshold"], cfg["max_per_img"])
    return (paddle.gather(bboxes.reshape([-1, 4]), index), paddle.gather(scores.reshape([-1]), index),
            paddle.gather(labels.reshape([-1]), index), num)


def predict_boxes(
    cls_scores: Sequence[paddle.Tensor],
    bbox_preds: Sequence[paddle.Tensor],
    img_metas: Sequence[dict],
    cfg: dict[str, Any] | None = None,
    rescale: bool = True,
    anchor_generator: AnchorGenerator | None = None,
    bbox_coder: DeltaXYWHBBoxCoder | None = None,
) -> list[Detections]:
    """Detections of a batch from the head's raw outputs (:func:`detect`, split per image).

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
    for cls_score, bbox_pred in zip(cls_scores, bbox_preds):
        assert cls_score.shape[-2:] == bbox_pred.shape[-2:], "cls and bbox maps of one level differ"

    with paddle.no_grad():
        bboxes, scores, labels, num = detect(
            cls_scores, bbox_preds, *image_tensors(img_metas, rescale), cfg, anchor_generator, bbox_coder)
    return split_detections(bboxes.numpy(), scores.numpy(), labels.numpy(), num.numpy(), paddle.to_tensor)


def image_tensors(img_metas: Sequence[dict], rescale: bool = True) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(img_shapes (N, 2), inv_scale_factors (N, 2))`` float32 for :func:`detect` from per-image metas."""
    shapes = [list(meta["img_shape"][:2]) for meta in img_metas]
    inverse = [[1 / meta["scale_factor"][0], 1 / meta["scale_factor"][1]] if rescale else [1.0, 1.0]
               for meta in img_metas]
    return (paddle.to_tensor(shapes, dtype="float32").reshape([-1, 2]),
            paddle.to_tensor(inverse, dtype="float32").reshape([-1, 2]))


def split_detections(bboxes, scores, labels, num, wrap=lambda a: a) -> list[Detections]:
    """Per-image :class:`Detections` from :func:`detect`'s outputs as numpy arrays;
    ``wrap`` turns each part into the wanted array type (``paddle.to_tensor``)."""
    out, start = [], 0
    for count in num.reshape(-1).tolist():
        part = slice(start, start + int(count))
        out.append(Detections(bboxes=wrap(bboxes.reshape(-1, 4)[part]), scores=wrap(scores.reshape(-1)[part]),
                              labels=wrap(labels.reshape(-1)[part].astype("int64"))))
        start += int(count)
    return out
