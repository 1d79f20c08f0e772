"""Seeded synthetic COCO ground truth and detections for exercising box evaluation.

The numbers are shaped after COCO val2017 and a trained detector's output, so
an evaluation does the work it does on the real set (the benchmark times it on
5,000 images; the tests compare evaluation backends on a few hundred):

- images 640 pixels on the long side, a quarter of them portrait;
- about 7.3 objects per image (negative binomial, so a few images are empty
  and a few crowded), categories drawn with a long-tailed frequency over the
  80 COCO classes;
- box sizes drawn as COCO's shares, 41 % small (area < 32x32), 34 % medium and
  25 % large; the annotated ``area``, which decides the area range as in
  COCO, is 50-95 % of the box (a mask covers less than its box), moving some
  objects down a range; about 1 % crowd (``iscrowd=1``) regions, all large;
- detections: exactly ``per_image`` per image (mmdet keeps at most 100),
  one or more near most objects with jittered corners, high scores and
  mostly the right class, and the rest random boxes of random classes with
  low scores, all given as float32 like a detector's output.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from paddle_impl.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASSES
from paddle_impl.evaluation.coco_eval import detections_to_coco_json

LONG_SIDE = 640
MEAN_OBJECTS = 7.3
# Negative-binomial shape of the object count: variance = mean + mean^2 / shape.
COUNT_SHAPE = 3.0
# Shares of small / medium / large objects, and the sqrt(area) range of each.
SIZE_SHARES = (0.41, 0.34, 0.25)
SIZE_RANGES = ((4.0, 32.0), (32.0, 96.0), (96.0, 400.0))
CROWD_RATE = 0.01
DETECTIONS_PER_IMAGE = 100


def category_weights(count: int = len(COCO_CATEGORY_IDS)) -> np.ndarray:
    """Long-tailed class frequencies (the first class, person, the most frequent), summing to 1."""
    weights = 1.0 / np.arange(1, count + 1) ** 0.9
    return weights / weights.sum()


def _random_boxes(rng: np.random.Generator, n: int, width: int, height: int,
                  size_class: np.ndarray) -> np.ndarray:
    """``(n, 4)`` float64 ``[x, y, w, h]`` inside a ``width`` x ``height`` image, with
    sqrt(area) log-uniform in ``SIZE_RANGES[size_class]`` and log-normal aspect ratios."""
    low = np.array([SIZE_RANGES[c][0] for c in size_class])
    high = np.array([SIZE_RANGES[c][1] for c in size_class])
    side = np.exp(rng.uniform(np.log(low), np.log(high)))
    aspect = np.exp(rng.normal(0.0, 0.5, n))
    w = np.clip(side * np.sqrt(aspect), 1.0, width)
    h = np.clip(side / np.sqrt(aspect), 1.0, height)
    x = rng.uniform(0.0, width - w)
    y = rng.uniform(0.0, height - h)
    return np.stack([x, y, w, h], axis=1)


def synthetic_ground_truth(num_images: int, seed: int = 0, cat_ids: Sequence[int] = COCO_CATEGORY_IDS,
                           first_id: int = 1) -> dict[str, Any]:
    """A COCO instances dict of ``num_images`` images (ids from ``first_id``) over ``cat_ids``.

    Boxes are ``[x, y, w, h]`` rounded to 2 decimals like COCO's, with ``area``
    (50-95 % of ``w * h``, as a mask's), ``iscrowd`` and no segmentation (box
    evaluation does not read it). A pure function of its arguments.
    """
    rng = np.random.default_rng([seed, 1])
    cat_ids = list(cat_ids)
    weights = category_weights(len(cat_ids))
    images, annotations = [], []
    for img_id in range(first_id, first_id + num_images):
        short = int(rng.integers(360, 481))
        width, height = (short, LONG_SIDE) if rng.random() < 0.25 else (LONG_SIDE, short)
        images.append(dict(id=img_id, file_name=f"{img_id:012d}.jpg", width=width, height=height))
        n = int(rng.negative_binomial(COUNT_SHAPE, COUNT_SHAPE / (COUNT_SHAPE + MEAN_OBJECTS)))
        if n == 0:
            continue
        crowd = rng.random(n) < CROWD_RATE
        size_class = np.where(crowd, 2, rng.choice(3, n, p=SIZE_SHARES))
        boxes = np.round(_random_boxes(rng, n, width, height, size_class), 2)
        areas = np.round(boxes[:, 2] * boxes[:, 3] * rng.uniform(0.5, 0.95, n), 2)
        labels = rng.choice(len(cat_ids), n, p=weights)
        for box, area, label, is_crowd in zip(boxes.tolist(), areas.tolist(), labels.tolist(), crowd.tolist()):
            annotations.append(dict(id=len(annotations) + 1, image_id=img_id, category_id=cat_ids[label],
                                    bbox=box, area=area, iscrowd=int(is_crowd)))
    categories = [dict(id=c, name=COCO_CLASSES[COCO_CATEGORY_IDS.index(c)] if c in COCO_CATEGORY_IDS else str(c))
                  for c in cat_ids]
    return dict(images=images, annotations=annotations, categories=categories)


def _jitter(rng: np.random.Generator, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(n, 4)`` xyxy: ``[x, y, w, h]`` boxes with each corner moved by up to ~15 % of the
    box side (a well-localised to a poorly-localised detection), clipped to the image."""
    spread = rng.uniform(0.02, 0.15, (len(boxes), 1))
    sides = np.concatenate([boxes[:, 2:], boxes[:, 2:]], axis=1)
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    xyxy = xyxy + rng.normal(0.0, 1.0, xyxy.shape) * spread * sides
    return _clip_xyxy(xyxy, width, height)


def _clip_xyxy(xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip to the image and keep every box at least 1 pixel wide and high (a detector's boxes)."""
    x1 = np.clip(xyxy[:, 0], 0.0, width - 1.0)
    y1 = np.clip(xyxy[:, 1], 0.0, height - 1.0)
    x2 = np.clip(np.maximum(xyxy[:, 2], x1 + 1.0), 0.0, width)
    y2 = np.clip(np.maximum(xyxy[:, 3], y1 + 1.0), 0.0, height)
    return np.stack([x1, y1, x2, y2], axis=1)


def synthetic_detections(ground_truth: Mapping[str, Any], seed: int = 0,
                         per_image: int = DETECTIONS_PER_IMAGE) -> list[dict]:
    """COCO result records of ``per_image`` detections on every image of ``ground_truth``.

    Any instances dict works (the tiny COCO's as well as
    :func:`synthetic_ground_truth`'s). For each annotated object, crowd or
    not: none with probability 0.1, otherwise 1 + Poisson(0.6) detections with
    jittered corners, scores ~ Beta(5, 2) and the object's class 90 % of the
    time. The rest up to ``per_image`` are random boxes of random classes with
    scores in [0.05, 0.6) leaning low. Per image the ``per_image`` best scores
    are kept. Records go through :func:`detections_to_coco_json` from float32
    ``(bboxes (K, 4) xyxy, scores (K,), labels (K,))``, as real detections do.
    """
    rng = np.random.default_rng([seed, 2])
    cat_ids = [c["id"] for c in ground_truth["categories"]]
    label_of = {c: i for i, c in enumerate(cat_ids)}
    weights = category_weights(len(cat_ids))
    per_image_anns: dict[int, list[dict]] = {}
    for ann in ground_truth["annotations"]:
        per_image_anns.setdefault(ann["image_id"], []).append(ann)

    results, image_ids = [], []
    for img in ground_truth["images"]:
        width, height = img["width"], img["height"]
        anns = per_image_anns.get(img["id"], [])
        boxes = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        labels = np.array([label_of[a["category_id"]] for a in anns], np.int64)
        copies = np.where(rng.random(len(anns)) < 0.1, 0, 1 + rng.poisson(0.6, len(anns)))
        boxes, labels = np.repeat(boxes, copies, axis=0), np.repeat(labels, copies)
        near = _jitter(rng, boxes, width, height)
        near_labels = np.where(rng.random(len(labels)) < 0.9, labels, rng.choice(len(cat_ids), len(labels), p=weights))
        near_scores = rng.beta(5.0, 2.0, len(labels))

        n_random = max(per_image - len(near), 0)
        size_class = rng.choice(3, n_random, p=SIZE_SHARES)
        random_xywh = _random_boxes(rng, n_random, width, height, size_class)
        random_boxes = _clip_xyxy(np.concatenate([random_xywh[:, :2], random_xywh[:, :2] + random_xywh[:, 2:]], 1),
                                  width, height)
        random_scores = 0.05 + 0.55 * rng.beta(1.2, 4.0, n_random)
        random_labels = rng.choice(len(cat_ids), n_random, p=weights)

        bboxes = np.concatenate([near, random_boxes]).astype(np.float32)
        scores = np.concatenate([near_scores, random_scores]).astype(np.float32)
        labels = np.concatenate([near_labels, random_labels]).astype(np.int64)
        keep = np.argsort(-scores, kind="stable")[:per_image]
        results.append((bboxes[keep], scores[keep], labels[keep]))
        image_ids.append(img["id"])
    return detections_to_coco_json(results, image_ids, cat_ids)
