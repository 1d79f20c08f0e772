"""``python -m bench.bench_coco_eval`` on a small synthetic set: both backends, the same numbers, a report."""
from __future__ import annotations

import json
import math

from bench.bench_coco_eval import main
from paddle_impl.evaluation.coco_eval import BBOX_METRIC_NAMES, EVAL_BACKENDS


def test_small_run_reports_both_backends(tmp_path, capsys):
    out = tmp_path / "reports" / "bench_coco_eval.json"
    assert main(["--images", "30", "--repeats", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(EVAL_BACKENDS[0]) and lines[1].startswith(EVAL_BACKENDS[1])
    assert "identical" in lines[2] and str(out) in lines[2]
    report = json.loads(out.read_text())
    assert report["identical"] is True
    assert report["data"]["images"] == 30 and report["data"]["detections"] == 3000
    assert all(len(report["seconds"][b]) == 2 for b in EVAL_BACKENDS)
    assert report["metrics"][EVAL_BACKENDS[0]] == report["metrics"][EVAL_BACKENDS[1]]
    assert list(report["metrics"][EVAL_BACKENDS[0]]) == list(BBOX_METRIC_NAMES)
    assert report["ratio"] == report["median_seconds"][EVAL_BACKENDS[0]] / report["median_seconds"][EVAL_BACKENDS[1]]
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_different_numbers_fail_the_run(tmp_path, monkeypatch, capsys):
    import bench.bench_coco_eval as bench

    real = bench.evaluate_bbox

    def skewed(*args, backend, **kwargs):
        metrics = real(*args, backend=backend, **kwargs)
        if backend == EVAL_BACKENDS[1]:
            metrics["bbox_mAP"] = math.nextafter(metrics["bbox_mAP"], 2.0)  # one unit in the last place
        return metrics

    monkeypatch.setattr(bench, "evaluate_bbox", skewed)
    out = tmp_path / "bench.json"
    assert main(["--images", "10", "--out", str(out)]) == 1
    assert "DIFFER" in capsys.readouterr().out
    assert json.loads(out.read_text())["identical"] is False
