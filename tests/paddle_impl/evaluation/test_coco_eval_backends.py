"""The two COCO evaluation backends give the same twelve numbers, float for float.

pycocotools is what mmdet's CocoMetric runs (``tests/paddle_impl/boxes`` checks
our pycocotools path against mmdet itself); faster-coco-eval must reproduce it
exactly, on the tiny COCO and on a seeded synthetic set with the cases that
make the two libraries differ unless corrected: curves whose first counted
detection is the only true positive (pycocotools' ``tp / (tp + fp + eps)``),
more than 100 detections of one class in one image (AP@[.5:.95] is read at
maxDets 100), crowd regions, an image without detections and a category
without ground truth.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from faster_coco_eval import COCO as FasterCOCO
from pycocotools.coco import COCO

from paddle_impl.data.tiny_coco import generate
from paddle_impl.evaluation.coco_eval import BBOX_METRIC_NAMES, EVAL_BACKENDS, evaluate_bbox
from paddle_impl.evaluation.synthetic import synthetic_detections, synthetic_ground_truth
from tests.paths import ROOT

REFERENCE, FASTER = EVAL_BACKENDS


def both(ground_truth, records) -> tuple[dict[str, float], dict[str, float]]:
    """(pycocotools' metrics, faster-coco-eval's) of the same inputs."""
    return (evaluate_bbox(ground_truth, records, backend=REFERENCE),
            evaluate_bbox(ground_truth, records, backend=FASTER))


def assert_identical(reference: dict[str, float], faster: dict[str, float]) -> None:
    assert list(reference) == list(faster) == list(BBOX_METRIC_NAMES)
    different = {k: (reference[k], faster[k]) for k in reference if reference[k] != faster[k]}
    assert not different, different


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("coco") / "tiny", train=8, val=4, seed=0, size=(128, 192))


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_identical_on_the_tiny_coco(tiny_coco, split):
    ann_file = tiny_coco / "annotations" / f"instances_{split}.json"
    dataset = json.loads(ann_file.read_text())
    records = synthetic_detections(dataset, seed=1)
    reference, faster = both(ann_file, records)
    assert_identical(reference, faster)
    assert 0 < reference["bbox_mAP"] < 1
    # The ground truth may come as a file, a dict or a COCO of either library.
    for source in (dataset, COCO(str(ann_file)), FasterCOCO(str(ann_file))):
        assert evaluate_bbox(source, records, backend=FASTER) == faster
        assert evaluate_bbox(source, records, backend=REFERENCE) == reference


@pytest.fixture(scope="module")
def synthetic():
    """300 synthetic images with the edge cases described in the module docstring."""
    gt = synthetic_ground_truth(300, seed=3)
    records = synthetic_detections(gt, seed=3)
    anns = gt["annotations"]
    # A category without ground truth, whose detections stay.
    no_gt = anns[0]["category_id"]
    gt["annotations"] = [a for a in anns if a["category_id"] != no_gt]
    assert any(r["category_id"] == no_gt for r in records)
    # An image with objects but no detection.
    silent = gt["annotations"][0]["image_id"]
    records = [r for r in records if r["image_id"] != silent]
    # 150 confident false detections of one class in one image push its true
    # detections past the 100th of that image and class.
    target = next(a for a in gt["annotations"] if a["image_id"] != silent and not a["iscrowd"])
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (150, 2))
    records += [dict(image_id=target["image_id"], category_id=target["category_id"], score=0.999,
                     bbox=[float(x), float(y), 20.0, 20.0]) for x, y in xy]
    return gt, records


def test_identical_on_a_synthetic_set_with_edge_cases(synthetic):
    gt, records = synthetic
    assert sum(a["iscrowd"] for a in gt["annotations"]) > 0
    reference, faster = both(gt, records)
    assert_identical(reference, faster)
    # The cases are live: AR grows with maxDets, so AP@100 and AP@1000 are different numbers.
    assert reference["bbox_AR@100"] < reference["bbox_AR@300"]


def test_identical_where_one_true_detection_is_a_whole_curve():
    """One object and one exact detection per class: pycocotools' precision is
    1 / (1 + eps), not 1, and so is the mean average precision."""
    gt = synthetic_ground_truth(40, seed=5)
    seen, kept = set(), []
    for ann in gt["annotations"]:
        if ann["category_id"] not in seen and not ann["iscrowd"]:
            seen.add(ann["category_id"])
            kept.append(ann)
    gt["annotations"] = kept
    records = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=list(a["bbox"]), score=0.9)
               for a in kept]
    reference, faster = both(gt, records)
    assert_identical(reference, faster)
    assert reference["bbox_mAP"] < 1.0 and reference["bbox_AR@100"] == 1.0


@pytest.mark.parametrize("order", ["true_first", "false_first"])
def test_identical_without_a_single_object_per_range(order):
    """Two medium objects and nothing small or large: no curve counts one object only."""
    gt = dict(images=[dict(id=1, width=640, height=480)], categories=[dict(id=1, name="person")],
              annotations=[dict(id=i + 1, image_id=1, category_id=1, bbox=[100.0 * i, 50.0, 50.0, 50.0],
                                area=2500.0, iscrowd=0) for i in range(2)])
    truth = [dict(image_id=1, category_id=1, bbox=list(a["bbox"]), score=0.8 - 0.1 * i)
             for i, a in enumerate(gt["annotations"])]
    false = [dict(image_id=1, category_id=1, bbox=[400.0, 300.0, 50.0, 50.0], score=0.75 if order == "true_first"
                  else 0.9)]
    reference, faster = both(gt, truth + false)
    assert_identical(reference, faster)
    assert reference["bbox_mAP_s"] == -1


def test_synthetic_data_look_like_coco():
    gt = synthetic_ground_truth(500, seed=0)
    records = synthetic_detections(gt, seed=0)
    anns = gt["annotations"]
    areas = np.array([a["area"] for a in anns])
    assert 6.5 < len(anns) / 500 < 8.5
    assert 0.3 < np.mean(areas < 32 ** 2) < 0.5 and 0.15 < np.mean(areas >= 96 ** 2) < 0.35
    assert 0 < sum(a["iscrowd"] for a in anns) < 0.03 * len(anns)
    per_image = np.bincount([r["image_id"] for r in records], minlength=501)[1:]
    assert (per_image == 100).all()
    assert gt == synthetic_ground_truth(500, seed=0) and records == synthetic_detections(gt, seed=0)


@pytest.mark.parametrize("backend", EVAL_BACKENDS)
def test_no_detections_give_no_metrics(backend):
    assert evaluate_bbox(synthetic_ground_truth(5), [], backend=backend) == {}


def test_unknown_backend_is_named():
    gt = synthetic_ground_truth(2)
    with pytest.raises(ValueError) as err:
        evaluate_bbox(gt, synthetic_detections(gt), backend="cocoapi")
    assert "'cocoapi'" in str(err.value) and all(b in str(err.value) for b in EVAL_BACKENDS)


def test_missing_package_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faster_coco_eval"
                        else real(name, *a))
    with pytest.raises(ValueError, match="faster_coco_eval"):
        evaluate_bbox(synthetic_ground_truth(2), [], backend=FASTER)


def test_faster_coco_eval_is_imported_only_when_chosen():
    code = ("import sys\n"
            "from paddle_impl.evaluation.coco_eval import evaluate_bbox\n"
            "from paddle_impl.evaluation.synthetic import synthetic_detections, synthetic_ground_truth\n"
            "gt = synthetic_ground_truth(3)\n"
            "assert evaluate_bbox(gt, synthetic_detections(gt))\n"
            "assert 'faster_coco_eval' not in sys.modules\n"
            "evaluate_bbox(gt, synthetic_detections(gt), backend='faster-coco-eval')\n"
            "assert 'faster_coco_eval' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
