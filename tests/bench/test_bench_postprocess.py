"""``python -m bench.bench_postprocess`` at a small size: both sides, equal detections, a report;
detections that differ fail the run."""
from __future__ import annotations

import json

import paddle_impl.boxes.postprocess as postprocess
from bench.bench_postprocess import CASES, main


def test_small_run_reports_both_sides(tmp_path, capsys):
    out = tmp_path / "bench_postprocess.json"
    assert main(["--size", "320x192", "--repeats", "1", "--threads", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [row["case"] for row in report["rows"]] == list(CASES)
    for row in report["rows"]:
        assert row["detections_agree"] and row["detections"] > 0 and row["candidates"] > 0
        assert row["ratio_to_mmdet"] == row["mmdet_ms"] / row["ours_ms"]
        assert f"{row['case']:<8}" in printed
    assert report["rows"][1]["candidates"] > 10 * report["rows"][0]["candidates"]


def test_different_detections_fail_the_run(tmp_path, monkeypatch):
    real = postprocess.predict_boxes

    def shifted(*args, **kwargs):
        return [d._replace(bboxes=d.bboxes + 0.01) for d in real(*args, **kwargs)]

    monkeypatch.setattr(postprocess, "predict_boxes", shifted)
    out = tmp_path / "bench_postprocess.json"
    assert main(["--size", "320x192", "--repeats", "1", "--threads", "2", "--out", str(out)]) == 1
    assert not any(row["detections_agree"] for row in json.loads(out.read_text())["rows"])
