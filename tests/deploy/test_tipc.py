"""The train-export-infer chain (``make tipc``) at small sizes: it passes, its reference
numbers lie between 0 and 1, and a detection that differs moves them."""
from __future__ import annotations

import copy
import json

import pytest

from align.deploy.tipc import main, same_detections
from paddle_impl.evaluation.coco_eval import evaluate_bbox

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    work = tmp_path_factory.mktemp("tipc")
    status = main(["--work-dir", str(work / "run"), "--iters", "2", "--build-dir", str(work / "build")])
    return status, work / "run"


def test_the_chain_passes_with_numbers_that_bite(chain):
    status, work = chain
    report = json.loads((work / "tipc.json").read_text())
    assert status == 0 and report["passed"], report["equal_to_dynamic"]
    assert report["reference_objects"] > 0
    for path in ("dynamic", "paddle-inference", "onnxruntime"):
        assert 0 < report["metrics_on_reference"][path]["bbox_mAP"] < 1, path
        assert report["detections"][path] == report["detections"]["dynamic"] > 0


def test_a_moved_box_or_a_changed_class_is_caught(chain):
    _, work = chain
    reference = json.loads((work / "reference_annotations.json").read_text())
    records = json.loads((work / "onnxruntime" / "detections.json").read_text())
    want = evaluate_bbox(reference, records)
    best = max(range(len(records)), key=lambda i: records[i]["score"])
    moved = copy.deepcopy(records)
    moved[best]["bbox"][0] += moved[best]["bbox"][2]  # off its reference object
    relabelled = copy.deepcopy(records)
    relabelled[best]["category_id"] = next(c["id"] for c in reference["categories"]
                                           if c["id"] != records[best]["category_id"])
    for changed in (moved, relabelled):
        assert not same_detections(records, changed)
        assert evaluate_bbox(reference, changed) != want
    assert same_detections(records, records[::-1])
