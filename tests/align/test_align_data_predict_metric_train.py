"""The data, predict, metric and train stages end to end on small inputs, and that errors are caught.

Every stage runs on the seeded tiny COCO generated into a temporary build
folder (with its own seeded checkpoint), at reduced image scales so the
whole file stays within a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.data.__main__ import main as data_main
from align.data.stage import DataOptions, run_data
from align.metric.__main__ import main as metric_main
from align.metric.stage import MetricOptions, first_divergence as metric_divergence, run_metric
from align.predict.stage import PredictOptions, run_predict, same_detections
from align.train.__main__ import main as train_main
from align.train.stage import TrainOptions, run_train

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow

SMALL_SCALE = (320, 192)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("build")


def assert_stage_files(reports: Path, stage: str) -> None:
    for suffix in ("_paddle.npy", "_torch.npy", "_diff.log", ".json", ".html"):
        assert (reports / f"{stage}{suffix}").is_file(), f"{stage}{suffix}"
    assert (reports / "index.html").is_file()


def test_data_stage_passes_with_flip_forced_both_ways(build_dir, tmp_path):
    result = run_data(DataOptions(scale=SMALL_SCALE, reports=tmp_path, build_dir=build_dir))
    failed = [(t.name, t.reason) for t in result.tensors if not t.passed]
    assert result.passed, failed[:5]
    names = {t.name for t in result.tensors}
    assert {"train.flip_on.img_ids", "train.flip_off.batch0.inputs", "train.flip_on.batch0.img1.gt_bboxes",
            "train.flip_on.batch1.img3.ignored_bboxes", "test.batch1.img100004.scale_factor"} <= names
    # The tiny COCO's image 6 has no annotation and image 7 is 24 px high: both filtered.
    assert result.meta["train_images_kept"] == [1, 2, 3, 4, 5, 8]
    assert result.meta["test_images"] == [100001, 100002, 100003, 100004]
    assert_stage_files(tmp_path, "data")
    assert json.loads((tmp_path / "data.json").read_text())["passed"] is True


def test_data_stage_catches_a_different_flip(build_dir, tmp_path):
    status = data_main(["--scale", "320,192", "--inject-flip-mismatch", "--reports", str(tmp_path),
                        "--build-dir", str(build_dir)])
    assert status == 1
    document = json.loads((tmp_path / "data.json").read_text())
    assert document["passed"] is False
    assert document["first_divergence"] == "train.flip_on.batch0.inputs"
    failed = {row["name"] for row in document["tensors"] if not row["passed"]}
    assert "train.flip_on.batch0.img1.gt_bboxes" in failed and "train.flip_on.batch0.img1.flip" in failed
    assert not any(name.startswith("test.") for name in failed)


def test_data_stage_rejects_a_bad_scale(build_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        data_main(["--scale", "320,abc", "--reports", str(tmp_path), "--build-dir", str(build_dir)])
    assert stopped.value.code == 2
    assert "argument --scale: a size is WxH, width first, such as 1333x800; got '320,abc'" in capsys.readouterr().err


def test_predict_stage_passes_with_detections(build_dir, tmp_path):
    result = run_predict(PredictOptions(scale=SMALL_SCALE, reports=tmp_path, build_dir=build_dir))
    failed = [(t.name, t.reason) for t in result.tensors if not t.passed]
    assert result.passed, failed[:5]
    counts = result.meta["detections_per_run"]
    assert counts["as_given"] == 0  # scores of a fresh detector stay below score_thr 0.05
    assert counts["sharpened"] > 100
    assert result.meta["worst_box_abs_diff_px"] <= 1e-3 and result.meta["worst_score_abs_diff"] <= 1e-5
    assert_stage_files(tmp_path, "predict")


def test_metric_stage_gives_identical_numbers(build_dir, tmp_path):
    result = run_metric(MetricOptions(reports=tmp_path, build_dir=build_dir))
    failed = [(t.name, t.reason) for t in result.tensors if not t.passed]
    assert result.passed, failed[:5]
    table = {row.metric: row for row in result.extra_tables[0].rows}
    assert len(table) == 12
    assert 0 < table["bbox_mAP"].mmdet_raw < 1
    assert all(row.mmdet_raw == row.paddle_raw and row.mmdet_reported == row.paddle_reported
               for row in table.values())
    assert_stage_files(tmp_path, "metric")


def test_metric_stage_catches_a_dropped_detection(build_dir, tmp_path):
    assert metric_main(["--drop-detection", "--reports", str(tmp_path), "--build-dir", str(build_dir)]) == 1
    document = json.loads((tmp_path / "metric.json").read_text())
    assert document["passed"] is False
    failed = {row["name"] for row in document["tensors"] if not row["passed"]}
    assert "stats.bbox_mAP" in failed and "stats.bbox_AR@100" in failed


def test_metric_stage_dropped_detection_divergence_is_in_the_records(build_dir, tmp_path):
    result = run_metric(MetricOptions(drop_detection=True, reports=tmp_path, build_dir=build_dir))
    assert not result.passed
    assert metric_divergence(result).startswith("records.")


def test_train_stage_passes_in_float64_and_reports_float32(build_dir, tmp_path):
    result = run_train(TrainOptions(iters=2, scale=SMALL_SCALE, reports=tmp_path, build_dir=build_dir))
    failed = [(t.name, t.reason) for t in result.tensors if not t.passed]
    assert result.passed, failed[:5]
    meta = result.meta
    assert meta["dtype"] == "float64" and meta["extra_dtype"] == "float32"
    # float64 agrees to ~2e-9 here (mmdet still rounds GHM-C's BCE to float32),
    # float32 to ~1.5e-7: the bound separates the two precisions.
    assert meta["worst_loss_rel_diff"] <= 1e-8
    assert meta["runs"]["float64"]["role"] == "checked"
    informational = meta["runs"]["float32"]
    assert informational["role"].startswith("informational")
    assert len(informational["loss_rel_diff_per_iteration"]) == 2
    assert max(informational["loss_rel_diff_per_iteration"]) <= 1e-4
    assert [t.name for t in result.tensors[:5]] == ["iter001.loss_cls", "iter001.loss_bbox", "iter001.loss",
                                                   "iter001.grad_norm", "iter001.lr"]
    titles = [title for title, _, _ in result.extra_tables]
    assert titles[0] == "Loss per iteration, float64 (checked)"
    assert "Loss per iteration, float32 (informational, not part of the verdict)" in titles
    assert len(result.figures) == 1 and result.figures[0][1].startswith(b"\x89PNG")
    assert_stage_files(tmp_path, "train_align")
    assert json.loads((tmp_path / "train_align.json").read_text())["passed"] is True


def test_train_stage_catches_a_different_lr(build_dir, tmp_path, monkeypatch, capsys):
    from paddle_impl.engine.lr_schedule import WarmupMultiStepLR

    lr_at = WarmupMultiStepLR.lr_at
    monkeypatch.setattr(WarmupMultiStepLR, "lr_at", lambda self, iteration: 1.01 * lr_at(self, iteration))
    status = train_main(["--iters", "1", "--extra-dtype", "none", "--scale", "320,192",
                         "--reports", str(tmp_path), "--build-dir", str(build_dir)])
    assert status == 1
    assert "first divergence: iter001.lr" in capsys.readouterr().out
    document = json.loads((tmp_path / "train_align.json").read_text())
    assert document["passed"] is False
    assert document["meta"]["dtype"] == "float64" and document["meta"]["extra_dtype"] is None
    assert list(document["meta"]["runs"]) == ["float64"]
    failed = {row["name"] for row in document["tensors"] if not row["passed"]}
    # The lr is applied after iteration 1's forward pass: only the lr differs.
    assert failed == {"iter001.lr"}


def test_same_detections_pairs_and_bounds():
    """Paired regardless of order; a label, a box past 1e-3 px, a score past 1e-5, a count
    or a NaN score that differs is caught."""
    import numpy as np

    rng = np.random.default_rng(0)
    ref = {"labels": np.array([3, 1, 3], np.int64), "bboxes": rng.uniform(0, 100, (3, 4)),
           "scores": np.array([0.9, 0.5, 0.5])}
    flipped = {k: v[::-1].copy() for k, v in ref.items()}
    assert same_detections(ref, flipped)
    within = {k: v.copy() for k, v in ref.items()}
    within["bboxes"][0, 0] += 0.9e-3
    within["scores"][1] += 0.9e-5
    assert same_detections(ref, within)
    for field, index, change in [("labels", 1, 1), ("bboxes", (2, 3), 1.1e-3), ("scores", 0, 1.1e-5),
                                 ("scores", 0, np.nan)]:
        changed = {k: v.copy() for k, v in ref.items()}
        changed[field] = changed[field].astype(np.float64) if field == "scores" else changed[field]
        changed[field][index] += change
        assert not same_detections(ref, changed), (field, change)
    assert not same_detections(ref, {k: v[:2] for k, v in ref.items()})
