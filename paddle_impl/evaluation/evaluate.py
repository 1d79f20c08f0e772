"""COCO box metrics of a detector over a data set, on one process or shared among several.

Each process predicts the images its loader yields: the whole set on one
process, or its share under ``paddle.distributed`` (the test loader of
:func:`~paddle_impl.data.dataset.build_dataloader` gives the ranks disjoint
shares that together hold every image once). Prediction calls the bare model,
never a ``DataParallel`` wrapper, so it runs no collective and shares of
unequal length, or empty ones, need no padding. The shares then travel as
compact arrays (:class:`ShardDetections`) in one ``all_gather_object`` (Paddle
has no object gather to a single rank); rank 0 puts them back in dataset
order (:func:`merge_shards`) and scores them, while the other ranks go on.
The results file, the records and the metrics are therefore those of one
process predicting every image in dataset order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import paddle.distributed as dist

from paddle_impl.data.dataset import CocoDetection
from paddle_impl.evaluation.coco_eval import EVAL_BACKENDS, detections_to_coco_json, evaluate_bbox

# One image's detections: bboxes (K, 4) float32 xyxy in original pixels, scores (K,) float32,
# labels (K,) int64.
ImageDetections = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class ShardDetections:
    """The detections of the images one process predicted, as a few flat arrays.

    ``indices`` ``(N,)`` int64: dataset indices, in prediction order.
    ``counts`` ``(N,)`` int64: detections of each of those images.
    ``bboxes`` ``(D, 4)`` float32, ``scores`` ``(D,)`` float32, ``labels``
    ``(D,)`` int64: the detections image after image, ``D = counts.sum()``.
    ``seconds``: wall time of the prediction.

    Five arrays pickle into one small message, where a list of per-image
    tensors would cost a header per image.
    """

    indices: np.ndarray
    counts: np.ndarray
    bboxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    seconds: float = 0.0

    @classmethod
    def from_images(cls, indices: Sequence[int], detections: Sequence[ImageDetections],
                    seconds: float = 0.0) -> "ShardDetections":
        if len(indices) != len(detections):
            raise ValueError(f"{len(indices)} indices for {len(detections)} images' detections")
        boxes = [np.asarray(d[0], np.float32).reshape(-1, 4) for d in detections]
        return cls(indices=np.asarray(indices, np.int64).reshape(-1),
                   counts=np.asarray([len(b) for b in boxes], np.int64).reshape(-1),
                   bboxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                   scores=np.concatenate([np.asarray(d[1], np.float32).reshape(-1) for d in detections]
                                         or [np.zeros(0, np.float32)]),
                   labels=np.concatenate([np.asarray(d[2], np.int64).reshape(-1) for d in detections]
                                         or [np.zeros(0, np.int64)]),
                   seconds=seconds)

    def images(self) -> Iterator[tuple[int, ImageDetections]]:
        """``(dataset index, (bboxes, scores, labels))`` per image, in prediction order."""
        ends = np.cumsum(self.counts)
        for index, end, count in zip(self.indices.tolist(), ends.tolist(), self.counts.tolist()):
            part = slice(end - count, end)
            yield index, (self.bboxes[part], self.scores[part], self.labels[part])


def predict_shard(model, loader) -> ShardDetections:
    """``model.predict`` on every batch of ``loader`` (this process's images); no collective."""
    started = time.perf_counter()
    indices: list[int] = []
    detections: list[ImageDetections] = []
    for batch in loader:
        metas = [{"img_shape": s, "scale_factor": f}
                 for s, f in zip(batch["img_shapes"], batch["scale_factors"])]
        for key, det in zip(batch["keys"], model.predict(batch["images"], metas)):
            indices.append(key.index)
            detections.append((det.bboxes.numpy(), det.scores.numpy(), det.labels.numpy()))
    return ShardDetections.from_images(indices, detections, time.perf_counter() - started)


def merge_shards(shards: Sequence[ShardDetections], size: int) -> list[ImageDetections]:
    """The detections of every image of a data set of ``size``, in dataset order.

    ``shards`` in rank order. Raises ``ValueError`` naming the index and the
    rank(s) when an image was predicted twice, is out of range, or was
    predicted by no rank: scoring a partial or doubled set would give wrong
    numbers that look right.
    """
    found: dict[int, tuple[int, ImageDetections]] = {}
    for rank, shard in enumerate(shards):
        for index, det in shard.images():
            if not 0 <= index < size:
                raise ValueError(f"rank {rank} predicted dataset index {index}, outside a set of {size} images")
            if index in found:
                raise ValueError(f"dataset index {index} was predicted by rank {found[index][0]} and rank {rank}")
            found[index] = (rank, det)
    missing = [i for i in range(size) if i not in found]
    if missing:
        raise ValueError(f"{len(missing)} of {size} images predicted by no rank "
                         f"(dataset indices {missing[:5]}{' ...' if len(missing) > 5 else ''})")
    return [found[i][1] for i in range(size)]


@dataclass
class Evaluation:
    """What rank 0 learns from one evaluation.

    ``metrics``: the 12 metrics named as mmdet's ``CocoMetric`` (empty when
    there is no detection at all). ``num_detections``: records scored.
    ``seconds``: rank 0's wall time from the start of its prediction to the
    metrics. ``predict_seconds`` and ``images_per_rank``: each rank's
    prediction time and image count, in rank order.
    """

    metrics: dict[str, float]
    num_detections: int
    seconds: float
    predict_seconds: list[float]
    images_per_rank: list[int]


def evaluate(model, loader, dataset: CocoDetection, out_json: Path | None = None, *,
             rank: int = 0, world_size: int = 1, backend: str = EVAL_BACKENDS[0]) -> Evaluation | None:
    """COCO box metrics of ``model`` on ``dataset``, each rank predicting its ``loader``'s share.

    Every rank must call it (with ``world_size > 1`` it gathers); rank 0
    returns the :class:`Evaluation` and writes the detections to ``out_json``
    (COCO result format) when given, the other ranks return None as soon as
    their share is sent. The metrics are computed by ``backend`` (one of
    ``EVAL_BACKENDS``, identical numbers). Leaves the model in eval mode; the
    caller switches back.
    """
    started = time.perf_counter()
    shard = predict_shard(model, loader)
    if world_size > 1:
        shards: list[ShardDetections] = []
        dist.all_gather_object(shards, shard)
    else:
        shards = [shard]
    if rank != 0:
        return None
    results = merge_shards(shards, len(dataset))
    records = detections_to_coco_json(results, dataset.img_ids, dataset.cat_ids, out_file=out_json)
    metrics = evaluate_bbox(dataset.ann_file, records, backend=backend)
    return Evaluation(metrics=metrics, num_detections=len(records), seconds=time.perf_counter() - started,
                      predict_seconds=[s.seconds for s in shards],
                      images_per_rank=[len(s.indices) for s in shards])
