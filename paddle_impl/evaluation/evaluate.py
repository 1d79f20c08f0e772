"""COCO box metrics of a detector over a data set."""
from __future__ import annotations

from pathlib import Path

from paddle_impl.data.dataset import CocoDetection
from paddle_impl.evaluation.coco_eval import EVAL_BACKENDS, detections_to_coco_json, evaluate_bbox


def evaluate(model, loader, dataset: CocoDetection, out_json: Path | None = None,
             backend: str = EVAL_BACKENDS[0]) -> tuple[dict[str, float], int]:
    """COCO box metrics of ``model`` on ``dataset`` (the whole set, on this process).

    Returns the 12 metrics named as mmdet's ``CocoMetric`` (empty when there is
    no detection at all), computed by ``backend`` (one of ``EVAL_BACKENDS``,
    identical numbers), and the number of detections; the detections are
    written to ``out_json`` (COCO result format) when given. Leaves the model
    in eval mode; the caller switches back.
    """
    results, img_ids = [], []
    for batch in loader:
        metas = [{"img_shape": s, "scale_factor": f}
                 for s, f in zip(batch["img_shapes"], batch["scale_factors"])]
        results.extend(model.predict(batch["images"], metas))
        img_ids.extend(batch["img_ids"])
    records = detections_to_coco_json(results, img_ids, dataset.cat_ids, out_file=out_json)
    return evaluate_bbox(dataset.ann_file, records, backend=backend), len(records)
