"""Training loop: exact resume, atomic checkpoints, logs, and input errors.

Runs the real ``python -m paddle_impl.train`` entry point (in-process, through
``main``) on a tiny synthetic COCO at a small scale (images resized to fit
128x96), so a training iteration takes a few seconds on two CPU cores. The
training set keeps 10 of its 12 images, so an epoch is 5 iterations of 2
images and a checkpoint after iteration 3 is in the middle of an epoch.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paddle_impl.engine import checkpoint as ckpt
from paddle_impl.evaluation.coco_eval import BBOX_METRIC_NAMES
from paddle_impl.data.tiny_coco import generate
from paddle_impl.train import main as train_main

from tests.paths import ROOT  # noqa: E402
from tests.trees import assert_same_tree

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow
COMMON = ["--scale", "128x96", "--num-workers", "0", "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "coco", train=12, val=2, seed=0, size=(128, 192))


@pytest.fixture(scope="module")
def runs(coco, tmp_path_factory) -> dict[str, Path]:
    """Six iterations straight, and three + resume + three, with a checkpoint every 3 iterations."""
    root = tmp_path_factory.mktemp("runs")
    straight, resumed = root / "straight", root / "resumed"
    base = ["--coco", str(coco), *COMMON, "--ckpt-interval-iters", "3"]
    assert train_main([*base, "--work-dir", str(straight), "--max-iters", "6"]) == 0
    assert train_main([*base, "--work-dir", str(resumed), "--max-iters", "3"]) == 0
    first_half = ckpt.load_checkpoint(resumed / "latest.ckpt")
    (root / "after3.pkl").write_bytes(pickle.dumps(first_half))
    assert train_main([*base, "--work-dir", str(resumed), "--max-iters", "6", "--resume"]) == 0
    return {"straight": straight, "resumed": resumed, "after3": root / "after3.pkl"}


def test_resume_mid_epoch_is_exact(runs):
    """3 + resume + 3 iterations end in the same state as 6 straight: weights, GHM, optimizer, schedule."""
    mid = pickle.loads(runs["after3"].read_bytes())
    assert mid["iter"] == 3 and mid["sampler"] == {"epoch": 0, "batch": 3}, "the resume point is mid-epoch"
    a = ckpt.load_checkpoint(runs["straight"] / "latest.ckpt")
    b = ckpt.load_checkpoint(runs["resumed"] / "latest.ckpt")
    assert a["iter"] == b["iter"] == 6
    assert a["sampler"] == b["sampler"] == {"epoch": 1, "batch": 1}
    for key in ("model", "ghm_per_rank", "optimizer", "lr_schedule", "sampler", "world_size"):
        assert_same_tree(a[key], b[key], key)
    # The state is not trivially equal: training moved it and the GHM buffers hold statistics.
    assert not np.array_equal(a["model"]["bbox_head.retina_cls.weight"],
                              mid["model"]["bbox_head.retina_cls.weight"])
    for key in ckpt.GHM_BUFFER_KEYS:
        assert np.any(a["model"][key] != mid["model"][key]), key
        assert np.any(a["model"][key] > 0), key
    assert len(a["optimizer"]["momentum_buffers"]) > 100

    # The resumed run replaced the interrupted run's later lines and logged the same losses.
    log_a = [json.loads(line) for line in open(runs["straight"] / "log.jsonl")]
    log_b = [json.loads(line) for line in open(runs["resumed"] / "log.jsonl")]
    assert [r["iter"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "loss_cls", "loss_bbox", "lr", "grad_norm", "loss_cls_levels"):
            assert ra[key] == rb[key], (ra["iter"], key)


def test_checkpoint_write_is_atomic(runs, tmp_path):
    """A crash in the middle of writing a checkpoint leaves the previous one whole and loadable."""
    target = tmp_path / "latest.ckpt"
    previous = pickle.loads(runs["after3"].read_bytes())
    ckpt.atomic_save(previous, target)
    before = target.read_bytes()

    def crash_half_way(obj, file_name):
        data = pickle.dumps(obj, protocol=4)
        with open(file_name, "wb") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt("simulated crash during the checkpoint write")

    newer = dict(previous, iter=previous["iter"] + 1)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save(newer, target, save_fn=crash_half_way)
    assert target.read_bytes() == before
    assert ckpt.load_checkpoint(target)["iter"] == previous["iter"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.ckpt"], "temporary file left behind"

    # A torn file (what a non-atomic write would leave) is reported, naming it.
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(before[: len(before) // 3])
    with pytest.raises(ckpt.CheckpointError, match="torn.ckpt"):
        ckpt.load_checkpoint(torn)


def test_logs_and_outputs(runs):
    work = runs["straight"]
    records = [json.loads(line) for line in open(work / "log.jsonl")]
    assert [r["iter"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records] == [1, 1, 1, 1, 1, 2]
    expected = {"iter", "epoch", "iter_in_epoch", "lr", "loss_cls", "loss_bbox", "loss",
                "loss_cls_levels", "loss_bbox_levels", "grad_norm", "time", "data_time", "eta_s", "eta"}
    for r in records:
        assert expected <= set(r), expected - set(r)
        assert len(r["loss_cls_levels"]) == len(r["loss_bbox_levels"]) == 5
        assert np.isclose(r["loss"], r["loss_cls"] + r["loss_bbox"], rtol=1e-6)
        assert np.isclose(r["loss_cls"], sum(r["loss_cls_levels"]), rtol=1e-5)
    # Warm-up of the reference schedule at lr 0.01 x 2 / 16, mmengine's first factor 0.001.
    assert records[0]["lr"] == pytest.approx(0.00125 * 0.001)
    assert all(a["lr"] < b["lr"] for a, b in zip(records, records[1:]))

    evals = [json.loads(line) for line in open(work / "eval.jsonl")]
    assert [(e["epoch"], e["iter"]) for e in evals] == [(1, 5), (2, 6)], "end of epoch 1, and the stop"
    for e in evals:
        assert {"epoch", "iter", "num_detections", *BBOX_METRIC_NAMES} <= set(e)
    for name in ("epoch_1.pdparams", "model_final.pdparams", "latest.ckpt", "train.html", "run.json"):
        assert (work / name).is_file(), name
    assert json.loads((work / "run.json").read_text())["eval_backend"] == "pycocotools"
    html = (work / "train.html").read_text()
    assert "data:image/png;base64," in html and "bbox_mAP" in html


def test_eval_backend_reaches_the_evaluation(coco, tmp_path, monkeypatch):
    from paddle_impl.evaluation import evaluate as evaluation

    seen = []
    real = evaluation.evaluate_bbox

    def spy(*args, backend, **kwargs):
        seen.append(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_bbox", spy)
    work = tmp_path / "work"
    assert train_main(["--coco", str(coco), "--work-dir", str(work), *COMMON, "--max-iters", "1",
                       "--eval-backend", "faster-coco-eval"]) == 0
    assert seen == ["faster-coco-eval"]
    assert json.loads((work / "run.json").read_text())["eval_backend"] == "faster-coco-eval"


def test_missing_coco_dir_fails_clearly(tmp_path, capsys):
    work = tmp_path / "work"
    assert train_main(["--coco", str(tmp_path / "nowhere"), "--work-dir", str(work), *COMMON]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not work.exists(), "no output for bad input"


def test_missing_annotation_file_fails_clearly(coco, tmp_path):
    broken = tmp_path / "coco"
    (broken / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        os.symlink(coco / split, broken / split)
    (broken / "annotations" / "instances_train2017.json").write_bytes(
        (coco / "annotations" / "instances_train2017.json").read_bytes())
    work = tmp_path / "work"
    # A real process, for the exit status.
    proc = subprocess.run([sys.executable, "-m", "paddle_impl.train", "--coco", str(broken),
                           "--work-dir", str(work), *COMMON],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "instances_val2017.json" in proc.stderr
    assert not work.exists()


def test_bad_mmdet_log_and_resume_file(coco, tmp_path, capsys):
    bad_log = tmp_path / "scalars.json"
    bad_log.write_text('{"loss": 1.0, "step": 1}\nnot json\n')
    args = ["--coco", str(coco), "--work-dir", str(tmp_path / "w"), *COMMON]
    assert train_main([*args, "--mmdet-log", str(bad_log)]) == 2
    assert "scalars.json, line 2" in capsys.readouterr().err
    assert train_main([*args, "--resume", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
