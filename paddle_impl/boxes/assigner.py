"""Max-IoU assignment of anchors to ground-truth boxes, as mmdet 3.3.0's MaxIoUAssigner.

Every anchor gets ``gt_inds``: ``0`` background, ``-1`` ignored, ``j + 1`` when
it regresses to ground truth ``j``. For each anchor, with ``m`` its best IoU
over the ground truths:

1. every anchor starts at ``-1``;
2. ``0 <= m < neg_iou_thr`` makes it background;
3. ``m >= pos_iou_thr`` assigns it to the ground truth reaching ``m`` (the
   first one on ties);
4. low-quality matches: for each ground truth ``i`` in order whose best IoU
   ``b_i`` over the anchors is ``>= min_pos_iou``, every anchor whose IoU
   with ``i`` equals ``b_i`` is assigned to ``i``, a later ground truth
   overwriting an earlier one.

Step 4 is done without a loop over ground truths: the loop's outcome for an
anchor is the last ground truth that claims it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import paddle

from paddle_impl.config import get_config
from paddle_impl.boxes.iou import bbox_overlaps


@dataclass
class AssignResult:
    """Assignment of the anchors of one image.

    Attributes:
        num_gts: number of ground-truth boxes.
        gt_inds: ``(A,)`` int64; 0 background, -1 ignored, ``j + 1`` ground truth ``j``.
        max_overlaps: ``(A,)`` float32 best IoU of each anchor over the ground truths
            (0 when there are none).
        labels: ``(A,)`` int64 class of the assigned ground truth, -1 unless ``gt_inds > 0``.
    """

    num_gts: int
    gt_inds: paddle.Tensor
    max_overlaps: paddle.Tensor
    labels: paddle.Tensor


@dataclass
class BatchAssignResult:
    """Assignment of the same anchors in each image of a batch.

    Attributes:
        num_gts: ``(B,)`` int64 number of real ground-truth boxes per image.
        gt_inds: ``(B, A)`` int64; 0 background, -1 ignored (or invalid anchor),
            ``j + 1`` for ``gt_bboxes[b, j]`` (index into the padded array).
        max_overlaps: ``(B, A)`` float32.
        labels: ``(B, A)`` int64, -1 unless ``gt_inds > 0``.
    """

    num_gts: paddle.Tensor
    gt_inds: paddle.Tensor
    max_overlaps: paddle.Tensor
    labels: paddle.Tensor


class MaxIoUAssigner:
    """Assign anchors to ground truths by IoU thresholds plus low-quality matches.

    Args:
        pos_iou_thr: an anchor whose best IoU is at least this is positive.
        neg_iou_thr: float ``t``: best IoU in ``[0, t)`` is background; a pair
            ``(lo, hi)``: best IoU in ``[lo, hi)`` is background.
        min_pos_iou: a ground truth whose best IoU is below this gets no
            low-quality match.
        gt_max_assign_all: low-quality matches go to every anchor tying for a
            ground truth's best IoU; otherwise only to the first such anchor.
        ignore_iof_thr: in :meth:`assign`, anchors covered by an ignore box by
            more than this IoF are ignored; negative disables it.
        ignore_wrt_candidates: the IoF is intersection over the anchor's area
            (True) or the ignore box's area (False).
        match_low_quality: apply the low-quality matching step.
    """

    def __init__(
        self,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float | Sequence[float] = 0.4,
        min_pos_iou: float = 0.0,
        gt_max_assign_all: bool = True,
        ignore_iof_thr: float = -1,
        ignore_wrt_candidates: bool = True,
        match_low_quality: bool = True,
    ) -> None:
        self.pos_iou_thr = float(pos_iou_thr)
        if isinstance(neg_iou_thr, (int, float)):
            self.neg_iou_range = (0.0, float(neg_iou_thr))
        else:
            assert len(neg_iou_thr) == 2, "neg_iou_thr is a float or a (low, high) pair"
            self.neg_iou_range = (float(neg_iou_thr[0]), float(neg_iou_thr[1]))
        self.min_pos_iou = float(min_pos_iou)
        self.gt_max_assign_all = gt_max_assign_all
        self.ignore_iof_thr = ignore_iof_thr
        self.ignore_wrt_candidates = ignore_wrt_candidates
        self.match_low_quality = match_low_quality

    @classmethod
    def from_config(cls, cfg: dict | None = None) -> "MaxIoUAssigner":
        """Build from ``cfg['train_cfg']['assigner']`` (default: :func:`get_config`)."""
        cfg = get_config() if cfg is None else cfg
        return cls(**cfg["train_cfg"]["assigner"])

    def assign(
        self,
        anchors: paddle.Tensor,
        gt_bboxes: paddle.Tensor,
        gt_labels: paddle.Tensor,
        gt_bboxes_ignore: paddle.Tensor | None = None,
    ) -> AssignResult:
        """Assign the anchors of one image; equal to mmdet's ``MaxIoUAssigner.assign``.

        Args:
            anchors: ``(A, 4)``; mmdet passes only the image's valid anchors.
            gt_bboxes: ``(G, 4)``.
            gt_labels: ``(G,)`` integer classes.
            gt_bboxes_ignore: ``(I, 4)`` regions whose anchors are ignored
                (only when ``ignore_iof_thr > 0``).

        Returns:
            :class:`AssignResult` over the ``A`` anchors. Without ground truths
            every anchor is background; without anchors the result is empty.
        """
        num_anchors, num_gts = anchors.shape[0], gt_bboxes.shape[0]
        if num_gts == 0 or num_anchors == 0:
            return AssignResult(
                num_gts=num_gts,
                gt_inds=paddle.full([num_anchors], 0 if num_gts == 0 else -1, dtype="int64"),
                max_overlaps=paddle.zeros([num_anchors], dtype="float32"),
                labels=paddle.full([num_anchors], -1, dtype="int64"),
            )

        overlaps = bbox_overlaps(gt_bboxes, anchors)
        if (
            self.ignore_iof_thr > 0
            and gt_bboxes_ignore is not None
            and gt_bboxes_ignore.shape[0] > 0
        ):
            if self.ignore_wrt_candidates:
                iof = bbox_overlaps(anchors, gt_bboxes_ignore, mode="iof").max(axis=1)
            else:
                iof = bbox_overlaps(gt_bboxes_ignore, anchors, mode="iof").max(axis=0)
            # An IoU of -1 keeps the anchor out of both thresholds and out of
            # every ground truth's best IoU.
            ignored = iof.unsqueeze(0) > self.ignore_iof_thr
            overlaps = paddle.where(ignored, paddle.full_like(overlaps, -1.0), overlaps)

        gt_mask = paddle.ones([1, num_gts], dtype="bool")
        gt_inds, max_overlaps = self._assign_wrt_overlaps(overlaps.unsqueeze(0), gt_mask)
        labels = self._gather_labels(gt_inds, gt_labels.unsqueeze(0))
        return AssignResult(
            num_gts=num_gts,
            gt_inds=gt_inds[0],
            max_overlaps=max_overlaps[0],
            labels=labels[0],
        )

    def assign_batch(
        self,
        anchors: paddle.Tensor,
        gt_bboxes: paddle.Tensor,
        gt_valid: paddle.Tensor,
        gt_labels: paddle.Tensor,
        valid: paddle.Tensor | None = None,
    ) -> BatchAssignResult:
        """Assign the same anchors in every image of a batch in one pass.

        For each image ``b`` and each anchor with ``valid[b]`` True the result
        equals ``assign(anchors[valid[b]], real gts of b, their labels)``, which
        is what mmdet computes (it assigns only the valid anchors: a ground
        truth's best IoU is taken over them alone). Invalid anchors get
        ``gt_inds = -1``, ``labels = -1``, ``max_overlaps = 0``: the caller
        gives them zero loss weight, as mmdet does for anchors it never assigned.

        Args:
            anchors: ``(A, 4)``, all levels concatenated.
            gt_bboxes: ``(B, Gmax, 4)`` padded ground truths.
            gt_valid: ``(B, Gmax)`` bool, True for real boxes; or ``(B,)``
                integer counts when the real boxes are the first ones.
            gt_labels: ``(B, Gmax)`` integer classes (padding values unused).
            valid: optional ``(B, A)`` bool, the anchors' valid flags per image.

        Returns:
            :class:`BatchAssignResult` with ``(B, A)`` tensors; ``gt_inds - 1``
            indexes ``gt_bboxes[b]`` including padding slots, so it equals the
            per-image index when the real boxes come first.
        """
        if self.pos_iou_thr <= 0:
            raise ValueError("assign_batch needs pos_iou_thr > 0: padding has IoU 0")
        batch, max_gts = gt_bboxes.shape[0], gt_bboxes.shape[1]
        num_anchors = anchors.shape[0]
        if valid is not None:
            valid = valid.astype("bool")
        if gt_valid.ndim == 1:
            slots = paddle.arange(max_gts, dtype="int64").unsqueeze(0)
            gt_mask = slots < gt_valid.astype("int64").unsqueeze(1)
        else:
            gt_mask = gt_valid.astype("bool")
        num_gts = gt_mask.astype("int64").sum(axis=1)

        if max_gts == 0 or num_anchors == 0:
            gt_inds = paddle.zeros([batch, num_anchors], dtype="int64")
            max_overlaps = paddle.zeros([batch, num_anchors], dtype="float32")
        else:
            # Padding slots and invalid anchors become zero-size boxes, whose IoU
            # with any box is exactly 0: they can neither raise an anchor's best
            # IoU nor a ground truth's, and no (B, Gmax, A) mask is needed.
            null_box = paddle.zeros([4], dtype=anchors.dtype)
            gt_bboxes = gt_bboxes.astype(anchors.dtype)
            gt_bboxes = paddle.where(gt_mask.unsqueeze(-1), gt_bboxes, null_box)
            anchors = anchors.unsqueeze(0)
            if valid is not None:
                anchors = paddle.where(valid.unsqueeze(-1), anchors, null_box)
            overlaps = bbox_overlaps(gt_bboxes, anchors)
            gt_inds, max_overlaps = self._assign_wrt_overlaps(overlaps, gt_mask, valid)

        if valid is not None:
            gt_inds = paddle.where(valid, gt_inds, paddle.full_like(gt_inds, -1))
            max_overlaps = paddle.where(valid, max_overlaps, paddle.zeros_like(max_overlaps))
        labels = self._gather_labels(gt_inds, gt_labels)
        return BatchAssignResult(
            num_gts=num_gts, gt_inds=gt_inds, max_overlaps=max_overlaps, labels=labels
        )

    def _assign_wrt_overlaps(
        self,
        overlaps: paddle.Tensor,
        gt_mask: paddle.Tensor,
        valid: paddle.Tensor | None = None,
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Steps 1-4 on precomputed IoUs.

        Args:
            overlaps: ``(B, G, A)`` IoUs, ``G, A > 0``. Padding ground truths
                and the anchors outside ``valid`` hold 0; ignored anchors -1.
            gt_mask: ``(B, G)`` bool, real ground truths.
            valid: optional ``(B, A)`` bool; the results of invalid anchors are
                meaningless and left to the caller.

        Returns:
            ``gt_inds (B, A)`` int64 and ``max_overlaps (B, A)`` float32; an
            image without real ground truths is all background with IoU 0.
        """
        # paddle.argmax reports the first maximum on ties, as torch's max(dim)
        # does (the tests pin this down). A padding slot can only win an
        # anchor at IoU 0, which is never positive.
        max_overlaps = overlaps.max(axis=1)
        argmax_overlaps = overlaps.argmax(axis=1)

        neg_low, neg_high = self.neg_iou_range
        is_neg = paddle.logical_and(max_overlaps >= neg_low, max_overlaps < neg_high)
        gt_inds = paddle.full_like(argmax_overlaps, -1)
        gt_inds = paddle.where(is_neg, paddle.zeros_like(gt_inds), gt_inds)
        gt_inds = paddle.where(max_overlaps >= self.pos_iou_thr, argmax_overlaps + 1, gt_inds)

        if self.match_low_quality:
            last_claim = self._last_low_quality_claim(overlaps, gt_mask, valid)
            gt_inds = paddle.where(last_claim >= 0, last_claim + 1, gt_inds)

        has_gts = gt_mask.any(axis=1, keepdim=True)
        gt_inds = paddle.where(has_gts, gt_inds, paddle.zeros_like(gt_inds))
        max_overlaps = paddle.where(has_gts, max_overlaps, paddle.zeros_like(max_overlaps))
        return gt_inds, max_overlaps

    def _last_low_quality_claim(
        self, overlaps: paddle.Tensor, gt_mask: paddle.Tensor, valid: paddle.Tensor | None
    ) -> paddle.Tensor:
        """``(B, A)`` int64: for each anchor the last ground truth whose
        low-quality match takes it, -1 for none; this is what mmdet's in-order
        loop over ground truths leaves behind."""
        num_gts, num_anchors = overlaps.shape[1], overlaps.shape[2]
        if self.gt_max_assign_all:
            # Anchors outside `valid` hold IoU 0, which never exceeds a real
            # ground truth's best IoU over the valid anchors (itself >= 0); at
            # a tie they claim too, but the caller discards them.
            gt_max_overlaps = overlaps.max(axis=2, keepdim=True)
            eligible = paddle.logical_and(
                gt_mask.unsqueeze(-1), gt_max_overlaps >= self.min_pos_iou
            )
            # IoU never exceeds 1, so an ineligible ground truth claims nothing.
            never = paddle.full_like(gt_max_overlaps, 2.0)
            target = paddle.where(eligible, gt_max_overlaps, never)
            claims = overlaps == target
        else:
            # The first anchor reaching the best IoU must be a valid one.
            if valid is not None:
                overlaps = paddle.where(
                    valid.unsqueeze(1), overlaps, paddle.full_like(overlaps, -1.0)
                )
            gt_max_overlaps = overlaps.max(axis=2)
            eligible = paddle.logical_and(gt_mask, gt_max_overlaps >= self.min_pos_iou)
            gt_argmax = paddle.where(
                eligible, overlaps.argmax(axis=2), paddle.full_like(gt_mask, -1, dtype="int64")
            )
            anchor_index = paddle.arange(num_anchors, dtype="int64").reshape([1, 1, -1])
            claims = anchor_index == gt_argmax.unsqueeze(-1)
        # The last claimant is the first one when the ground truths are read
        # backwards (index_select: several times faster than paddle.flip on CPU).
        reverse = paddle.arange(num_gts - 1, -1, -1, dtype="int64")
        backwards = paddle.index_select(claims, reverse, axis=1).astype("uint8")
        last = (num_gts - 1) - backwards.argmax(axis=1)
        return paddle.where(claims.any(axis=1), last, paddle.full_like(last, -1))

    @staticmethod
    def _gather_labels(gt_inds: paddle.Tensor, gt_labels: paddle.Tensor) -> paddle.Tensor:
        """``(B, A)`` class of each positive anchor, -1 elsewhere; ``gt_labels`` is ``(B, G)``."""
        positive = gt_inds > 0
        if gt_labels.shape[1] == 0 or gt_inds.shape[1] == 0:
            return paddle.full_like(gt_inds, -1)
        index = (gt_inds - 1).clip(min=0)
        labels = paddle.take_along_axis(gt_labels.astype("int64"), index, axis=1)
        return paddle.where(positive, labels, paddle.full_like(labels, -1))
