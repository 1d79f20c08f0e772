"""``bench.data_wait``: its share arithmetic, options and command line, and one small real run.

The unit tests use made-up log records; the slow test runs the benchmark as a
process (two short training runs at 160x96) and reads its JSON (no figure is
judged: the machine is shared).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.data_wait import (parse_args, summary_line, training_command, training_images, wait_share)
from paddle_impl.train import parse_args as train_args
from tests.paths import ROOT


def _records(*pairs):
    return [{"iter": i + 1, "data_time": d, "time": t} for i, (d, t) in enumerate(pairs)]


def test_share_is_the_summed_wait_over_the_summed_iterations_after_the_skipped_ones():
    records = _records((3.0, 5.0), (0.5, 10.0), (0.0, 10.0), (1.0, 20.0))
    out = wait_share(records, skip=1)
    assert out["data_wait_share"] == pytest.approx(1.5 / 40.0)
    assert out["measured_iterations"] == [2, 3, 4]
    assert out["data_time_median_s"] == 0.5 and out["time_median_s"] == 10.0 and out["data_time_max_s"] == 1.0
    assert out["skipped"] == [{"iter": 1, "data_time": 3.0, "time": 5.0}]
    assert [r["iter"] for r in out["per_iteration"]] == [2, 3, 4]
    assert wait_share(records, skip=0)["data_wait_share"] == pytest.approx(4.5 / 45.0)


@pytest.mark.parametrize("records, skip, message", [
    (_records((0.1, 1.0)), 1, "leaves none"),
    (_records((0.1, 1.0)), -1, "leaves none"),
    (_records((2.0, 1.0), (0.1, 1.0)), 0, "iteration 1"),
    (_records((0.1, 1.0), (-0.1, 1.0)), 0, "iteration 2"),
    (_records((0.1, 1.0), (0.0, math.nan)), 0, "iteration 2"),
])
def test_share_refuses_records_it_cannot_measure(records, skip, message):
    with pytest.raises(ValueError, match=message):
        wait_share(records, skip)


def test_enough_images_for_one_epoch():
    # Two of the tiny COCO's fixed roles are dropped by the training filter.
    assert training_images(2, 24) - 2 >= 2 * 24


def test_the_run_is_the_training_program_with_its_own_options(tmp_path):
    command = training_command(tmp_path / "coco", tmp_path / "run", (1333, 800), 2, 24, 2, 0)
    assert command[:3] == [sys.executable, "-m", "paddle_impl.train"]
    args = train_args(command[3:])  # the training program's own parser accepts it
    assert args.scale == (1333, 800) and args.num_workers == 2 and args.max_iters == 24
    assert args.batch_size == 2 and args.eval_interval == 0 and args.no_progress


def test_options():
    args = parse_args([])
    assert args.size == (1333, 800) and args.workers == [0, 2] and args.iters > args.skip >= 1
    assert parse_args(["--workers", "4"]).workers == [4]


@pytest.mark.parametrize("argv, named", [
    (["--workers", "0,0"], "--workers"), (["--workers", "-1"], "--workers"), (["--workers", "two"], "--workers"),
    (["--iters", "0"], "--iters"), (["--skip", "3", "--iters", "3"], "--skip"), (["--size", "800"], "--size"),
    (["--timeout", "0"], "--timeout"),
])
def test_bad_options_stop_with_the_option_named(argv, named, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2
    assert named in capsys.readouterr().err


def test_summary_is_one_line_with_every_run():
    runs = [{"num_workers": w, **wait_share(_records((1.0, 2.0), (0.1, 10.0), (0.2, 10.0)), 1)} for w in (0, 2)]
    report = {"settings": {"size": "1333x800", "batch": 2, "iters": 3, "skip": 1}, "runs": runs}
    line = summary_line(report, "reports/bench_data.json")
    assert "\n" not in line and "0 workers 1.50%" in line and "2 workers 1.50%" in line
    assert "iterations 2-3" in line


@pytest.mark.slow
def test_small_runs_with_and_without_workers(tmp_path):
    out = tmp_path / "bench_data.json"
    proc = subprocess.run([sys.executable, "-m", "bench.data_wait", "--size", "160x96", "--iters", "3",
                           "--skip", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    report = json.loads(out.read_text())
    assert [r["num_workers"] for r in report["runs"]] == [0, 2]
    for run in report["runs"]:
        assert run["measured_iterations"] == [2, 3]
        assert len(run["skipped"]) == 1
        assert 0 <= run["data_wait_share"] < 1
        for row in run["per_iteration"]:
            assert math.isfinite(row["time"]) and row["time"] > 0 and 0 <= row["data_time"] <= row["time"]
