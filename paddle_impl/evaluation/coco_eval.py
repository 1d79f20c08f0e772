"""COCO bounding-box evaluation with pycocotools, configured as mmdet 3.3.0's ``CocoMetric(metric='bbox')``.

mmdet's settings, reproduced here:

- ``params.maxDets = [100, 300, 1000]`` (its ``proposal_nums``) and the ten
  IoU thresholds 0.50:0.05:0.95; ``params.imgIds`` is every image of the
  annotation file (images without detections count), in file order.
- ``COCOeval.stats`` then holds, in order: AP@[.5:.95] (pycocotools
  summarizes this one at maxDets 100, the others at ``maxDets[2] = 1000``),
  AP50, AP75, AP small / medium / large, AR@100, AR@300, AR@1000 and
  AR small / medium / large @1000. They are named as mmdet names them:
  ``bbox_mAP`` ... ``bbox_mAP_l``, ``bbox_AR@100`` ... ``bbox_AR_l@1000``.
  mmdet reports only the six AP items by default and rounds each to three
  decimals; :func:`evaluate_bbox` returns all twelve, unrounded unless asked.
- Detections become ``[x, y, w, h]`` with ``w = x2 - x1`` and ``h = y2 - y1``
  computed in float64 from the float32 corners (mmdet's ``xyxy2xywh`` goes
  through ``tolist()``), and ``score`` is the float32 score as a float.
- With no detection in the whole dataset mmdet logs an error and returns no
  metrics; so does :func:`evaluate_bbox`.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from align.engine.atomic_write import write_json

logger = logging.getLogger(__name__)

# mmdet's CocoMetric default proposal_nums, used as params.maxDets.
PROPOSAL_NUMS = (100, 300, 1000)

# Names of COCOeval.stats[0..11], as mmdet's CocoMetric reports them for 'bbox'.
BBOX_METRIC_NAMES = (
    "bbox_mAP",
    "bbox_mAP_50",
    "bbox_mAP_75",
    "bbox_mAP_s",
    "bbox_mAP_m",
    "bbox_mAP_l",
    "bbox_AR@100",
    "bbox_AR@300",
    "bbox_AR@1000",
    "bbox_AR_s@1000",
    "bbox_AR_m@1000",
    "bbox_AR_l@1000",
)


def _to_numpy(x: Any) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _unpack(result: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bboxes (K, 4), scores (K,), labels (K,))`` of one image's result,
    given as a :class:`~paddle_impl.boxes.postprocess.Detections`, a
    ``(bboxes, scores, labels)`` tuple or a dict with those keys."""
    if isinstance(result, Mapping):
        bboxes, scores, labels = result["bboxes"], result["scores"], result["labels"]
    else:
        bboxes, scores, labels = result
    return (
        _to_numpy(bboxes).reshape(-1, 4),
        _to_numpy(scores).reshape(-1),
        _to_numpy(labels).reshape(-1),
    )


def detections_to_coco_json(
    results: Sequence[Any],
    image_ids: Sequence[int],
    label_to_cat_id: Sequence[int] | Mapping[int, int],
    out_file: str | os.PathLike | None = None,
) -> list[dict]:
    """COCO result records of a list of per-image detections.

    Args:
        results: per image ``(bboxes (K, 4) xyxy, scores (K,), labels (K,))``
            as a :class:`~paddle_impl.boxes.postprocess.Detections`, a tuple or a
            dict with those keys, of Paddle tensors or arrays.
        image_ids: the COCO ``image_id`` of each result.
        label_to_cat_id: COCO ``category_id`` of each label index
            (e.g. ``coco.getCatIds()`` for the 80 COCO classes).
        out_file: when given, the records are also written there as JSON,
            atomically.

    Returns:
        One dict per detection, image by image in input order:
        ``image_id``, ``bbox`` ``[x, y, w, h]``, ``score``, ``category_id``.
    """
    assert len(results) == len(image_ids), "one image id per result"
    records: list[dict] = []
    for result, image_id in zip(results, image_ids):
        bboxes, scores, labels = _unpack(result)
        # float64 before subtracting: mmdet subtracts Python floats.
        corners = bboxes.astype(np.float64)
        xywh = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
        image_id = int(image_id)
        records.extend(
            dict(image_id=image_id, bbox=box, score=score, category_id=int(label_to_cat_id[label]))
            for box, score, label in zip(xywh.tolist(), scores.astype(np.float64).tolist(), labels.tolist())
        )
    if out_file is not None:
        write_json(out_file, records)
    return records


def _quiet_coco(ann_file: str | os.PathLike) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def evaluate_bbox(
    ann_file_or_coco: str | os.PathLike | COCO,
    detections: str | os.PathLike | Iterable[dict],
    cat_ids: Sequence[int] | None = None,
    ndigits: int | None = None,
) -> dict[str, float]:
    """The 12 COCO box metrics of ``detections`` against the ground truth.

    Args:
        ann_file_or_coco: COCO annotation file, or a loaded ``COCO``.
        detections: result records as made by :func:`detections_to_coco_json`,
            or the path of a JSON file holding them.
        cat_ids: categories evaluated (default: all of the annotation file;
            mmdet uses the dataset's classes, which for COCO are all of them).
        ndigits: round each number like mmdet's reported values
            (``ndigits=3``); ``None`` keeps pycocotools' values.

    Returns:
        ``{name: value}`` for the names in :data:`BBOX_METRIC_NAMES`, in that
        order; ``-1`` where pycocotools has nothing to average (no ground
        truth in an area range); an empty dict when there are no detections.
        The pycocotools summary table is logged at INFO level.
    """
    coco_gt = ann_file_or_coco if isinstance(ann_file_or_coco, COCO) else _quiet_coco(ann_file_or_coco)
    if isinstance(detections, (str, os.PathLike)):
        with open(detections) as f:
            detections = json.load(f)
    # loadRes adds keys (area, id, ...) to the records it is given: work on copies.
    records = [dict(d) for d in detections]
    if not records:
        logger.error("The testing results of the whole dataset is empty: no box metrics.")
        return {}

    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_dt = coco_gt.loadRes(records)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.params.catIds = list(cat_ids) if cat_ids is not None else coco_gt.getCatIds()
        coco_eval.params.imgIds = coco_gt.getImgIds()
        coco_eval.params.maxDets = list(PROPOSAL_NUMS)
        coco_eval.params.iouThrs = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("COCO bbox evaluation:\n%s", summary.getvalue())

    stats = [float(v) for v in coco_eval.stats]
    if ndigits is not None:
        stats = [round(v, ndigits) for v in stats]
    return dict(zip(BBOX_METRIC_NAMES, stats))
