"""COCO bounding-box evaluation configured as mmdet 3.3.0's ``CocoMetric(metric='bbox')``.

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

Two backends compute the numbers (:data:`EVAL_BACKENDS`): ``pycocotools``,
what mmdet itself uses and the default, and ``faster-coco-eval``, a drop-in
whose per-image matching and accumulation run in C++ (``make bench-coco-eval``
times both). Both get the settings above and return the same twelve floats,
bit for bit, which takes two corrections on faster-coco-eval's side (1.8.0):
its accumulation computes the precision without pycocotools' ``eps``, put
back by :func:`_restore_pycocotools_precision`, and its own ``summarize``
takes AP@[.5:.95] at ``maxDets[-1]`` where pycocotools takes 100, so the
twelve are read here in pycocotools' order and settings instead.
faster-coco-eval is imported only when chosen.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from common.atomic_write import write_json

logger = logging.getLogger(__name__)

# mmdet's CocoMetric default proposal_nums, used as params.maxDets.
PROPOSAL_NUMS = (100, 300, 1000)

# The libraries evaluate_bbox can compute the metrics with; the first is the default.
EVAL_BACKENDS = ("pycocotools", "faster-coco-eval")

# pycocotools' COCOeval.summarize for boxes, as (ap, iouThr, areaRng, maxDets) of
# stats[0..11] with maxDets = PROPOSAL_NUMS: AP@[.5:.95] at 100, the rest at 1000.
_SUMMARY_ITEMS = (
    (1, None, "all", PROPOSAL_NUMS[0]),
    (1, 0.5, "all", PROPOSAL_NUMS[2]),
    (1, 0.75, "all", PROPOSAL_NUMS[2]),
    (1, None, "small", PROPOSAL_NUMS[2]),
    (1, None, "medium", PROPOSAL_NUMS[2]),
    (1, None, "large", PROPOSAL_NUMS[2]),
    (0, None, "all", PROPOSAL_NUMS[0]),
    (0, None, "all", PROPOSAL_NUMS[1]),
    (0, None, "all", PROPOSAL_NUMS[2]),
    (0, None, "small", PROPOSAL_NUMS[2]),
    (0, None, "medium", PROPOSAL_NUMS[2]),
    (0, None, "large", PROPOSAL_NUMS[2]),
)

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


def check_backend(backend: str) -> str:
    """``backend`` when it is one of :data:`EVAL_BACKENDS` and installed; otherwise a
    ``ValueError`` naming it (a run learns it at start, not at its first evaluation)."""
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}: choose one of {', '.join(EVAL_BACKENDS)}")
    module = backend.replace("-", "_")
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"COCO evaluation backend {backend!r} needs the Python package {module}, "
                         f"which is not installed (`make setup` installs it)")
    return backend


def _dataset_or_path(source: Any) -> Mapping[str, Any] | str:
    """The annotations behind ``source``: its dict (a ``COCO`` of either library keeps it as
    ``.dataset``) or the annotation file's path."""
    dataset = getattr(source, "dataset", source)
    return dataset if isinstance(dataset, Mapping) else str(dataset)


def _pycocotools_gt(source: Any) -> COCO:
    """pycocotools' ``COCO`` of an annotation file, a dataset dict or faster-coco-eval's ``COCO``."""
    if isinstance(source, COCO):
        return source
    annotations = _dataset_or_path(source)
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(annotations, str):
            return COCO(annotations)
        coco = COCO()
        coco.dataset = annotations
        coco.createIndex()
        return coco


def _faster_gt(source: Any):
    """faster-coco-eval's ``COCO`` of an annotation file, a dataset dict or pycocotools' ``COCO``."""
    import faster_coco_eval

    if isinstance(source, faster_coco_eval.COCO):
        return source
    return faster_coco_eval.COCO(_dataset_or_path(source), print_function=lambda *_: None)


def _configure(params, coco_gt, cat_ids: Sequence[int] | None) -> None:
    """mmdet's CocoMetric settings on a COCOeval's ``params`` (the same attributes in both libraries)."""
    params.catIds = list(cat_ids) if cat_ids is not None else coco_gt.getCatIds()
    params.imgIds = coco_gt.getImgIds()
    params.maxDets = list(PROPOSAL_NUMS)
    params.iouThrs = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


def _stats_pycocotools(coco_gt: COCO, records: list[dict], cat_ids: Sequence[int] | None
                       ) -> tuple[list[float], str]:
    """The twelve ``COCOeval.stats`` and the text pycocotools printed."""
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_dt = coco_gt.loadRes(records)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        _configure(coco_eval.params, coco_gt, cat_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats], summary.getvalue()


def _valid_gt_counts(coco_gt, params) -> np.ndarray:
    """pycocotools' ``npig`` of every (category, area range): ``(K, A)`` counts of the
    ground-truth boxes that are not crowd and whose ``area`` lies in the range (ends
    included), over ``params.imgIds``, categories sorted as ``COCOeval.evaluate`` sorts them."""
    cat_index = {int(c): k for k, c in enumerate(np.unique(params.catIds))}
    images = set(params.imgIds)
    anns = [a for a in coco_gt.dataset.get("annotations", [])
            if a["image_id"] in images and a["category_id"] in cat_index and not a.get("iscrowd", 0)]
    counts = np.zeros((len(cat_index), len(params.areaRng)), np.int64)
    if anns:
        cats = np.array([cat_index[a["category_id"]] for a in anns])
        areas = np.array([a["area"] for a in anns], np.float64)
        for k_a, (low, high) in enumerate(params.areaRng):
            inside = (areas >= low) & (areas <= high)
            counts[:, k_a] = np.bincount(cats[inside], minlength=len(cat_index))
    return counts


def _probe_thresholds(npig: np.ndarray) -> np.ndarray:
    """Sorted recall thresholds ``1.5 / npig``, one per distinct count of a curve with ground truth."""
    return np.unique(1.5 / npig[npig > 0])


def _restore_pycocotools_precision(result: dict, npig: np.ndarray, num_recall: int, probes: np.ndarray) -> None:
    """Make faster-coco-eval's accumulation ``result`` pycocotools' own, bit for bit.

    ``result['precision']`` and ``result['scores']`` are ``(T, R + P, K, A, M)``:
    pycocotools' ``num_recall`` = R recall thresholds, then the P ``probes``
    of :func:`_probe_thresholds`; they leave as ``(T, R, K, A, M)``.

    pycocotools computes the precision after each detection as
    ``tp / (fp + tp + eps)`` with ``eps = np.spacing(1)``; the C++ accumulation
    divides by ``fp + tp`` alone. For ``fp + tp >= 2`` the eps is lost to
    rounding, so the two differ only where one detection has been counted and
    it is a true positive: pycocotools has ``1 / (1 + eps)`` there, the C++
    code 1.0. After both take the running maximum from the right, an entry
    that the C++ code left at 1.0 is exactly 1.0 in pycocotools when the
    first two counted detections of that curve are both true positives (a
    later all-true prefix gives 1.0), and ``1 / (1 + eps)`` otherwise.

    The probe at ``1.5 / npig`` of a curve falls on its second true
    positive: the precision there is 1.0 exactly when no false positive came
    before it (and 0 when there is no second true positive).
    """
    full_precision, full_scores = result["precision"], result["scores"]
    precision = full_precision[:, :num_recall].copy()
    if len(probes):
        # (K, A) probe column of each curve; curves without ground truth (all -1) take any.
        column = num_recall + np.searchsorted(probes, 1.5 / np.maximum(npig, 1)).clip(max=len(probes) - 1)
        k, a = np.indices(npig.shape)
        two_true_first = full_precision[:, column, k, a, :] == 1.0  # (T, K, A, M)
        one_of_one = 1.0 / (0.0 + 1.0 + np.spacing(1))
        precision[(precision == 1.0) & ~two_true_first[:, None]] = one_of_one
    result["precision"] = precision
    result["scores"] = full_scores[:, :num_recall].copy()


def _stats_faster(coco_gt, records: list[dict], cat_ids: Sequence[int] | None) -> tuple[list[float], str]:
    """pycocotools' twelve stats computed by faster-coco-eval, and the lines it reported."""
    import faster_coco_eval

    lines: list[str] = []
    previous, coco_gt.print_function = coco_gt.print_function, lines.append
    try:
        coco_dt = coco_gt.loadRes(records)
    finally:
        coco_gt.print_function = previous
    coco_eval = faster_coco_eval.COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lines.append)
    params = coco_eval.params
    _configure(params, coco_gt, cat_ids)
    npig = _valid_gt_counts(coco_gt, params)
    probes = _probe_thresholds(npig)
    recall_thresholds = params.recThrs
    # One C++ pass (evaluate() also accumulates) answers the probes beside pycocotools' thresholds.
    params.recThrs = np.concatenate([recall_thresholds, probes])
    coco_eval.evaluate()
    coco_eval.accumulate()
    params.recThrs = coco_eval._paramsEval.recThrs = recall_thresholds
    _restore_pycocotools_precision(coco_eval.eval, npig, len(recall_thresholds), probes)
    # Its own summarize() takes AP@[.5:.95] at maxDets[-1]: read pycocotools' twelve instead.
    stats = [float(coco_eval._summarize(ap, iouThr=iou, areaRng=area, maxDets=max_dets))
             for ap, iou, area, max_dets in _SUMMARY_ITEMS]
    return stats, "\n".join(lines) + "\n"


def evaluate_bbox(
    ann_file_or_coco: str | os.PathLike | Mapping[str, Any] | COCO,
    detections: str | os.PathLike | Iterable[dict],
    cat_ids: Sequence[int] | None = None,
    ndigits: int | None = None,
    backend: str = EVAL_BACKENDS[0],
) -> dict[str, float]:
    """The 12 COCO box metrics of ``detections`` against the ground truth.

    Args:
        ann_file_or_coco: COCO annotation file, its content as a dict, or a
            loaded ``COCO`` of pycocotools or faster-coco-eval (one of the
            other library is rebuilt from its ``dataset``).
        detections: result records as made by :func:`detections_to_coco_json`,
            or the path of a JSON file holding them.
        cat_ids: categories evaluated (default: all of the annotation file;
            mmdet uses the dataset's classes, which for COCO are all of them).
        ndigits: round each number like mmdet's reported values
            (``ndigits=3``); ``None`` keeps the computed values.
        backend: one of :data:`EVAL_BACKENDS`; both give identical numbers.

    Returns:
        ``{name: value}`` for the names in :data:`BBOX_METRIC_NAMES`, in that
        order; ``-1`` where there is nothing to average (no ground truth in an
        area range); an empty dict when there are no detections. The summary
        table is logged at INFO level.

    Raises:
        ValueError: ``backend`` is not one of :data:`EVAL_BACKENDS`.
    """
    check_backend(backend)
    pycocotools = backend == "pycocotools"
    coco_gt = _pycocotools_gt(ann_file_or_coco) if pycocotools else _faster_gt(ann_file_or_coco)
    if isinstance(detections, (str, os.PathLike)):
        with open(detections) as f:
            detections = json.load(f)
    # loadRes adds keys (area, id, ...) to the records it is given: work on copies.
    records = [dict(d) for d in detections]
    if not records:
        logger.error("The testing results of the whole dataset is empty: no box metrics.")
        return {}

    stats, summary = (_stats_pycocotools if pycocotools else _stats_faster)(coco_gt, records, cat_ids)
    logger.info("COCO bbox evaluation (%s):\n%s", backend, summary)
    if ndigits is not None:
        stats = [round(v, ndigits) for v in stats]
    return dict(zip(BBOX_METRIC_NAMES, stats))
