"""Shared evaluation: 2 launched CPU processes (gloo) give the numbers and detections of one process.

One training iteration on 2 processes through ``paddle.distributed.launch``
(the benchmark's :func:`bench.distributed_run.launch`), ending the first epoch,
so the run evaluates its weights once on a validation set of 5 images: rank 0
predicts 3 of them, rank 1 predicts 2. The reference is one process predicting
the same weights (``model_final.pdparams``) on the same images through
``python -m paddle_impl.predict``, with the CPU setting the training program
applies (:func:`paddle_impl.engine.runtime.configure_cpu`), so the arithmetic
is the same. The weights are random but for a zero box regression (the boxes
are anchors) and a classifier bias of 0 for the classes present (scores near
0.5): every image has its full 100 detections to compare, and those on
objects give metrics above 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.distributed_run import WORLD_SIZE, launch
from paddle_impl.data.coco_classes import COCO_CATEGORY_IDS
from paddle_impl.data.tiny_coco import generate
from paddle_impl.engine.runtime import configure_cpu
from paddle_impl.evaluation.coco_eval import BBOX_METRIC_NAMES

from tests.paths import ROOT  # noqa: E402

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow
SCALE = "128x96"
VAL_IMAGES = 5  # 3 on rank 0, 2 on rank 1


def _init_weights(path: Path, coco: Path) -> Path:
    """Seeded random weights, but with the box regression at 0 (the boxes are anchors, some of
    which overlap objects) and the classifier bias at 0 for the classes of the validation set's
    objects (scores near 0.5 pass the 0.05 threshold; the other classes keep the prior's 0.01)."""
    import paddle

    from paddle_impl.model.detector import RetinaNet

    paddle.seed(0)
    model = RetinaNet.from_config()
    head = model.bbox_head
    for param in (head.retina_reg.weight, head.retina_reg.bias):
        param.set_value(paddle.zeros_like(param))
    ann = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    labels = sorted({COCO_CATEGORY_IDS.index(a["category_id"]) for a in ann["annotations"]})
    bias = head.retina_cls.bias.numpy()
    classes = len(COCO_CATEGORY_IDS)
    for anchor in range(bias.size // classes):  # channel = anchor * classes + label
        bias[[anchor * classes + label for label in labels]] = 0.0
    head.retina_cls.bias.set_value(paddle.to_tensor(bias))
    paddle.save(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist_eval")
    coco = generate(tmp / "coco", train=4, val=VAL_IMAGES, seed=0, size=(128, 192))
    run_dir = tmp / "dp2"
    launch(["--coco", str(coco), "--work-dir", str(run_dir), "--init", str(_init_weights(tmp / "init.pdparams", coco)),
            "--batch-size", "2", "--epochs", "1", "--max-iters", "1", "--scale", SCALE, "--num-workers", "0",
            "--seed", "0", "--eval-interval", "1", "--no-progress"],
           tmp / "launch_log", tmp / "launch.out", timeout=900)

    out = tmp / "single" / "results.json"
    env = dict(os.environ)
    configure_cpu(environ=env)
    proc = subprocess.run([sys.executable, "-m", "paddle_impl.predict", "--weights",
                           str(run_dir / "model_final.pdparams"), "--ann-file",
                           str(coco / "annotations" / "instances_val2017.json"), "--img-prefix",
                           str(coco / "val2017"), "--scale", SCALE, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": run_dir, "single": out, "coco": coco}


def test_two_processes_score_as_one(runs):
    evals = [json.loads(line) for line in open(runs["run"] / "eval.jsonl")]
    assert len(evals) == 1 and (evals[0]["epoch"], evals[0]["iter"]) == (1, 1)
    record = evals[0]
    single = json.loads(runs["single"].with_name("results.metrics.json").read_text())
    assert list(single) == list(BBOX_METRIC_NAMES)
    assert {k: record[k] for k in BBOX_METRIC_NAMES} == single
    assert record["bbox_mAP_50"] > 0, "detections on objects: the metrics compared are not all 0"
    # Every rank predicted its share, and rank 0 logged each one's time.
    assert record["images_per_rank"] == [3, 2]
    assert len(record["predict_time_per_rank"]) == WORLD_SIZE
    assert all(isinstance(t, float) for t in [record["eval_time"], *record["predict_time_per_rank"]])


def test_two_processes_write_the_detections_of_one(runs):
    shared = json.loads((runs["run"] / "val_results.bbox.json").read_text())
    single = json.loads(runs["single"].read_text())
    assert len(shared) == VAL_IMAGES * 100, "every image has its 100 detections"
    key = lambda r: (r["image_id"], r["category_id"], r["score"], r["bbox"])  # noqa: E731
    assert sorted(shared, key=key) == sorted(single, key=key)
    # In dataset order, as one process writes them.
    assert shared == single
    evals = [json.loads(line) for line in open(runs["run"] / "eval.jsonl")]
    assert evals[0]["num_detections"] == len(shared)
