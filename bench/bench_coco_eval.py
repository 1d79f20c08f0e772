"""Time COCO box evaluation: pycocotools against faster-coco-eval on the same detections.

    python -m bench.bench_coco_eval [--images 5000] [--seed 0] [--repeats 1] [--out reports/bench_coco_eval.json]

The data are made in memory by :mod:`paddle_impl.evaluation.synthetic`: a
seeded ground truth shaped after COCO val2017 (5,000 images by default, about
7 boxes per image over the 80 classes, small / medium / large areas, some
crowd regions) and 100 detections per image, some near the objects with
high scores and the rest random with low scores.

Each backend runs :func:`paddle_impl.evaluation.coco_eval.evaluate_bbox` on
that same ground truth dict and detection list, as training evaluates: build
its index of the ground truth, load the detections, match, accumulate and
summarize with mmdet's settings. Reading the annotation json is left out.
The time of a backend is the median of ``--repeats`` runs, the two backends
taking turns. The run fails (exit status 1) unless the twelve numbers of the
two backends are equal, float for float.

Console: one line per backend and the ratio (pycocotools time / faster-coco-eval
time). The JSON report holds the data's description, every run's time, both
sets of metrics and the machine's load before and after.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from importlib.metadata import version

import numpy as np

from common.atomic_write import write_json
from bench.machine import cpu_info, load_average
from common.arguments import non_negative, positive
from paddle_impl.evaluation.coco_eval import EVAL_BACKENDS, check_backend, evaluate_bbox
from paddle_impl.evaluation.synthetic import synthetic_detections, synthetic_ground_truth

REFERENCE, FASTER = EVAL_BACKENDS


def describe(ground_truth: dict, records: list[dict]) -> dict:
    """Counts of the data evaluated: images, boxes by area range, crowds, detections."""
    anns = ground_truth["annotations"]
    areas = np.array([a["area"] for a in anns], np.float64)
    return dict(
        images=len(ground_truth["images"]),
        categories=len(ground_truth["categories"]),
        boxes=len(anns),
        boxes_per_image=len(anns) / max(len(ground_truth["images"]), 1),
        small=int((areas < 32 ** 2).sum()),
        medium=int(((areas >= 32 ** 2) & (areas < 96 ** 2)).sum()),
        large=int((areas >= 96 ** 2).sum()),
        crowd=sum(a["iscrowd"] for a in anns),
        images_without_boxes=len(ground_truth["images"]) - len({a["image_id"] for a in anns}),
        detections=len(records),
    )


def environment() -> dict:
    return dict(
        python=platform.python_version(),
        numpy=np.__version__,
        pycocotools=version("pycocotools"),
        faster_coco_eval=version("faster-coco-eval"),
        **cpu_info(),
    )


def timed(backend: str, ground_truth: dict, records: list[dict]) -> tuple[float, dict[str, float]]:
    """Seconds of one evaluation by ``backend``, and its metrics."""
    start = time.perf_counter()
    metrics = evaluate_bbox(ground_truth, records, backend=backend)
    return time.perf_counter() - start, metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive, default=5000, help="images of the synthetic ground truth")
    parser.add_argument("--seed", type=non_negative, default=0, help="seed of the synthetic data")
    parser.add_argument("--repeats", type=positive, default=1, help="timed runs per backend (median)")
    parser.add_argument("--out", default="reports/bench_coco_eval.json", help="JSON report path")
    args = parser.parse_args(argv)
    try:
        check_backend(FASTER)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")

    ground_truth = synthetic_ground_truth(args.images, seed=args.seed)
    records = synthetic_detections(ground_truth, seed=args.seed)
    data = describe(ground_truth, records)

    load_before = load_average()
    seconds: dict[str, list[float]] = {REFERENCE: [], FASTER: []}
    metrics: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for backend in EVAL_BACKENDS:
            elapsed, metrics[backend] = timed(backend, ground_truth, records)
            seconds[backend].append(elapsed)
    load_after = load_average()

    identical = metrics[REFERENCE] == metrics[FASTER] and list(metrics[REFERENCE]) == list(metrics[FASTER])
    median = {backend: statistics.median(times) for backend, times in seconds.items()}
    ratio = median[REFERENCE] / median[FASTER]
    report = dict(
        environment=environment(), data=data, seed=args.seed, repeats=args.repeats,
        seconds=seconds, median_seconds=median, ratio=ratio, identical=identical,
        metrics=metrics, load_average_before=load_before, load_average_after=load_after,
    )
    out = write_json(args.out, report, indent=2)

    for backend in EVAL_BACKENDS:
        print(f"{backend:17s} {data['images']:,d} images, {data['boxes']:,d} boxes, {data['detections']:,d} "
              f"detections: {median[backend]:8.2f} s  bbox_mAP {metrics[backend].get('bbox_mAP', float('nan')):.4f}")
    verdict = "the 12 numbers identical" if identical else "THE 12 NUMBERS DIFFER"
    load = (f"; 1-minute load {load_before[0]:.2f} before, {load_after[0]:.2f} after"
            if load_before and load_after else "")
    print(f"ratio {REFERENCE} / {FASTER}: {ratio:.2f}x ({verdict}{load}) -> {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
