"""Metric alignment: the same detections scored by mmdet's ``CocoMetric`` and by ours.

The detections are seeded and synthetic, on the val split of the seeded tiny
COCO: every non-crowd ground-truth box jittered (Gaussian, 4% of its width and height), with its
label replaced by a random one 20% of the time, plus 3 to 10 random false
positives per image (labels drawn from the classes present, so they hurt the
precision), scores uniform in [0.05, 1). That exercises true and false
positives, wrong classes, small and medium objects and an image without
ground truth; real predictions of the synthetic checkpoint would all be
false positives (AP 0 everywhere), which compares nothing.

mmdet's side is ``CocoMetric(metric='bbox')`` from the config's val_evaluator
(pointed at the tiny COCO's val annotations, all twelve ``metric_items``),
fed the detections as ``pred_instances`` through ``process`` and
``compute_metrics``; the raw ``COCOeval.stats`` it computes are recorded by a
subclass of pycocotools' ``COCOeval`` put in its place for the call. Ours is
``detections_to_coco_json`` + ``evaluate_bbox``.

Compared, all exactly: the COCO result records (image ids, category ids,
``[x, y, w, h]`` boxes, scores), the twelve raw numbers, and the twelve
numbers as mmdet reports them (rounded to 3 decimals).
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from align.engine.compare import TensorDiff, first_failed_name
from align.engine.reprod import reprod_log_diff
from align.engine.report import Headline, StageResult
from align.engine.rows import exact_row
from align.engine.options import option, seed_option
from align.ghm.pair import GhmStageOptions
from align.ghm.pipelines import VAL_SPLIT, ann_file, mmdet_setup, our_dataset, tiny_coco_root
from align.ghm.suite import write_report
from paddle_impl.config import get_config

# Relative to each box's size, so tiny objects are matched as often as large ones.
JITTER_REL = 0.04
WRONG_LABEL_RATE = 0.2


class MetricRow(NamedTuple):
    """One COCO box metric: both raw values and both as reported (rounded to 3 decimals)."""

    metric: str
    mmdet_raw: float
    paddle_raw: float
    mmdet_reported: float
    paddle_reported: float


@dataclass
class MetricOptions(GhmStageOptions):
    ckpt: str | None = option(None, "accepted for a uniform command line; the metric stage scores seeded "
                                    "synthetic detections and uses no weights")
    seed: int = seed_option("seed of the tiny COCO and the detections (default %(default)s)")
    # Deliberate error for testing the stage: our side loses its best-scoring
    # correctly labelled detection.
    drop_detection: bool = option(False, "deliberate error: Paddle's side loses one true detection "
                                         "(the stage must fail)")


@dataclass
class Detections:
    """Per image of the val split: ``img_id``, ``ori_shape`` ``(h, w)``, ``bboxes`` ``(K, 4)``
    float32 xyxy, ``scores`` ``(K,)`` float32, ``labels`` ``(K,)`` int64, ``true`` ``(K,)`` bool
    (jittered ground truth with its own label)."""

    img_id: int
    ori_shape: tuple[int, int]
    bboxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    true: np.ndarray


def synthetic_detections(dataset, seed: int) -> list[Detections]:
    """Seeded detections for every image of ``dataset`` (our val ``CocoDetection``)."""
    rng = np.random.default_rng([seed, 7])
    present = np.unique(np.concatenate([r.labels for r in dataset.records]))
    if present.size == 0:
        raise ValueError(f"{dataset.ann_file}: the val split has no object to detect")
    out = []
    for record in dataset.records:
        gt = record.boxes[~record.ignore].astype(np.float64)
        labels = record.labels[~record.ignore].copy()
        sizes = np.tile(gt[:, 2:] - gt[:, :2], 2)
        boxes = gt + rng.normal(0.0, JITTER_REL, gt.shape) * sizes
        wrong = rng.random(len(labels)) < WRONG_LABEL_RATE
        labels[wrong] = rng.choice(present, int(wrong.sum()))
        true = ~wrong
        num_fp = int(rng.integers(3, 11))
        size = rng.uniform(8, 0.5 * min(record.width, record.height), (num_fp, 2))
        corner = rng.uniform(0, 1, (num_fp, 2)) * ([record.width, record.height] - size)
        boxes = np.concatenate([boxes, np.concatenate([corner, corner + size], axis=1)])
        labels = np.concatenate([labels, rng.choice(present, num_fp)])
        true = np.concatenate([true, np.zeros(num_fp, bool)])
        scores = rng.uniform(0.05, 1.0, len(labels))
        out.append(Detections(record.img_id, (record.height, record.width), boxes.astype(np.float32),
                              scores.astype(np.float32), labels.astype(np.int64), true))
    return out


def drop_best_true(dets: list[Detections]) -> tuple[list[Detections], int]:
    """A copy without the highest-scoring true detection; returns it and that detection's image id."""
    best = max(((d.scores[j], i, j) for i, d in enumerate(dets) for j in np.flatnonzero(d.true)),
               default=None)
    if best is None:
        raise ValueError("no true detection to drop")
    _, i, j = best
    dets = copy.deepcopy(dets)
    keep = np.arange(len(dets[i].scores)) != j
    d = dets[i]
    dets[i] = Detections(d.img_id, d.ori_shape, d.bboxes[keep], d.scores[keep], d.labels[keep], d.true[keep])
    return dets, d.img_id


def mmdet_metric(cfg, ann: Path, dets: list[Detections], classes) -> tuple[dict, np.ndarray | None, list]:
    """mmdet's ``CocoMetric`` on ``dets``: (reported dict, raw COCOeval.stats, its json records)."""
    import json

    import torch
    from mmdet.evaluation.metrics import coco_metric
    from mmdet.registry import METRICS

    from paddle_impl.evaluation.coco_eval import BBOX_METRIC_NAMES

    seen = {}
    original = coco_metric.COCOeval

    class RecordingCOCOeval(original):
        """pycocotools' COCOeval keeping a copy of the stats mmdet rounds away."""

        def summarize(self):
            super().summarize()
            seen["stats"] = np.array(self.stats, np.float64)

    evaluator = copy.deepcopy(cfg.val_evaluator)
    evaluator.ann_file = str(ann)
    evaluator.metric_items = [name[len("bbox_"):] for name in BBOX_METRIC_NAMES]
    metric = METRICS.build(evaluator)
    metric.dataset_meta = dict(classes=list(classes))
    samples = [dict(img_id=d.img_id, ori_shape=d.ori_shape,
                    pred_instances=dict(bboxes=torch.from_numpy(d.bboxes), scores=torch.from_numpy(d.scores),
                                        labels=torch.from_numpy(d.labels))) for d in dets]
    coco_metric.COCOeval = RecordingCOCOeval
    try:
        metric.process({}, samples)
        reported = metric.compute_metrics(metric.results)
    finally:
        coco_metric.COCOeval = original
    with tempfile.TemporaryDirectory() as tmp:
        files = metric.results2json([r for _, r in metric.results], str(Path(tmp) / "mmdet"))
        with open(files["bbox"]) as f:
            records = json.load(f)
    return reported, seen.get("stats"), records


def record_arrays(records: list[dict]) -> dict[str, np.ndarray]:
    return {
        "records.image_id": np.array([r["image_id"] for r in records], np.int64),
        "records.category_id": np.array([r["category_id"] for r in records], np.int64),
        "records.bbox": np.array([r["bbox"] for r in records], np.float64).reshape(-1, 4),
        "records.score": np.array([r["score"] for r in records], np.float64),
    }


def run_metric(opts: MetricOptions) -> StageResult:
    """Score the same detections on both sides, diff, write ``metric*`` files into ``opts.reports``."""
    from paddle_impl.data.coco_classes import COCO_CLASSES
    from paddle_impl.evaluation.coco_eval import BBOX_METRIC_NAMES, detections_to_coco_json, evaluate_bbox

    root = tiny_coco_root(opts.build_dir, opts.seed)
    ann = ann_file(root, VAL_SPLIT)
    cfg = mmdet_setup()
    dataset = our_dataset(root, train=False, scale=tuple(get_config()["data"]["test_scale"]))
    dets = synthetic_detections(dataset, opts.seed)
    ours_in, dropped_from = (drop_best_true(dets) if opts.drop_detection else (dets, None))

    t0 = time.perf_counter()
    reported, stats, mm_records = mmdet_metric(cfg, ann, dets, COCO_CLASSES)
    mmdet_s = time.perf_counter() - t0
    if stats is None:
        raise ValueError("mmdet's CocoMetric computed no statistics (no detection at all?)")
    t0 = time.perf_counter()
    records = detections_to_coco_json([(d.bboxes, d.scores, d.labels) for d in ours_in],
                                      [d.img_id for d in ours_in], dataset.cat_ids)
    ours = evaluate_bbox(ann, records)
    paddle_s = time.perf_counter() - t0

    torch_out = record_arrays(mm_records)
    paddle_out = record_arrays(records)
    for name in BBOX_METRIC_NAMES:
        short = name[len("bbox_"):]
        torch_out[f"stats.{name}"] = np.float64(stats[BBOX_METRIC_NAMES.index(name)])
        paddle_out[f"stats.{name}"] = np.float64(ours.get(name, np.nan))
        torch_out[f"reported.{name}"] = np.float64(reported.get(short, reported.get(name, np.nan)))
        paddle_out[f"reported.{name}"] = np.float64(round(ours[name], 3) if name in ours else np.nan)
    rows: list[TensorDiff] = [exact_row(name, torch_out[name], paddle_out[name]) for name in torch_out]
    reprod = reprod_log_diff(paddle_out, torch_out, opts.reports, "metric", 0.0)

    table = [MetricRow(name, float(stats[i]), ours.get(name, float("nan")), torch_out[f"reported.{name}"],
                       paddle_out[f"reported.{name}"]) for i, name in enumerate(BBOX_METRIC_NAMES)]
    meta = {
        "seed": opts.seed,
        "annotations": str(ann),
        "images": [d.img_id for d in dets],
        "detections": int(sum(len(d.scores) for d in dets)),
        "true_detections": int(sum(int(d.true.sum()) for d in dets)),
        "detection_dropped_on_paddle_side_from_image": dropped_from,
        "mmdet_s": round(mmdet_s, 3),
        "paddle_s": round(paddle_s, 3),
    }
    return write_report(StageResult(
        stage="metric",
        title="Metric: mmdet's CocoMetric vs Paddle's evaluate_bbox on the same detections",
        passed=all(row.passed for row in rows),
        tensors=rows,
        thresholds={"records, 12 raw numbers, 12 reported numbers": "exact"},
        meta=meta,
        extra_tables=[("COCO box metrics", ["metric", "mmdet raw", "paddle raw", "mmdet reported",
                                            "paddle rounded"], table)],
        reprod_log=reprod,
        reprod_log_threshold=0.0,
        reprod_log_check=0.0,
        headline=Headline.largest_abs(rows, 0.0, "largest |diff| of the COCO numbers"),
    ), opts.reports)


def first_divergence(result: StageResult) -> str | None:
    return first_failed_name(result.tensors)
