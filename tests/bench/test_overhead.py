"""``bench.overhead``: its share arithmetic, report, summary and options, and one small real run.

The unit tests use made-up times; the slow test runs the benchmark as a
process at 160x96 with one timed round and reads its JSON (no figure is
judged: the machine is shared).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.overhead import (PADDLE_SHARES, PADDLE_TIMES, RepeatedBatch, build_report, non_network_share,
                            parse_args, side_summary, summary_line)
from tests.paths import ROOT


def test_non_network_share_is_the_part_outside_the_network():
    assert non_network_share(9.0, 10.0) == pytest.approx(0.1)
    assert non_network_share(10.0, 10.0) == 0.0
    # A network slower than the whole (a load change between the two) is reported as measured.
    assert non_network_share(11.0, 10.0) == pytest.approx(-0.1)


@pytest.mark.parametrize("network, total", [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (math.nan, 1.0),
                                            (1.0, math.inf)])
def test_non_network_share_refuses_times_that_are_not_positive_and_finite(network, total):
    with pytest.raises(ValueError, match="positive and finite"):
        non_network_share(network, total)


def _paddle_round(network, iteration, wait=0.01):
    return {"network_s": network, "iteration_s": iteration, "data_wait_s": wait,
            "step_s": iteration - wait, "loading_work_s": 0.1,
            "network_cpu_s": 2 * network, "iteration_cpu_s": 2.5 * iteration}


def _mmdet_round(network, step):
    return {"network_s": network, "train_step_s": step, "loading_work_s": 0.2,
            "network_cpu_s": network, "train_step_cpu_s": step}


def test_side_summary_takes_the_shares_of_the_medians_and_the_range_per_round():
    rounds = [_paddle_round(8.0, 10.0), _paddle_round(9.0, 12.0), _paddle_round(30.0, 31.0)]
    out = side_summary(rounds, PADDLE_TIMES, PADDLE_SHARES)
    assert out["network_s"] == 9.0 and out["iteration_s"] == 12.0
    assert out["non_network_share"] == pytest.approx(1 - 9.0 / 12.0)
    assert out["non_network_share_of_step"] == pytest.approx(1 - 9.0 / 11.99)
    assert out["non_network_share_cpu"] == pytest.approx(1 - 18.0 / 30.0)
    assert out["non_network_share_range"] == pytest.approx([1 - 30.0 / 31.0, 1 - 9.0 / 12.0])
    assert out["rounds"] == rounds
    with pytest.raises(ValueError, match="no timed rounds"):
        side_summary([], PADDLE_TIMES, PADDLE_SHARES)


def _report():
    warmup = {"paddle": {"loss": 2.0}, "mmdet": {"loss": 2.0 * (1 + 1e-6)}}
    return build_report(settings={"size": "1333x800", "batch": 2, "repeats": 2}, environment={"cpu_count": 2},
                        batch={"batch_input_shape": [800, 1216]},
                        paddle_rounds=[_paddle_round(9.0, 10.0), _paddle_round(9.5, 10.5)],
                        mmdet_rounds=[_mmdet_round(7.0, 10.0), _mmdet_round(7.0, 10.0)],
                        warmup=warmup, load_average_before=[1.0, 1.0, 1.0],
                        load_average_after=[1.0, 1.0, 1.0], wall_s=60.0)


def test_report_has_both_sides_with_medians_shares_and_rounds():
    report = _report()
    for key in ("settings", "environment", "batch", "paddle", "mmdet", "warmup", "first_step_loss_rel_diff",
                "load_average_before", "load_average_after", "wall_s"):
        assert key in report, key
    paddle, mmdet = report["paddle"], report["mmdet"]
    for key in ("network_s", "iteration_s", "data_wait_s", "step_s", "loading_work_s", "network_cpu_s",
                "iteration_cpu_s", "non_network_share", "non_network_share_of_step", "non_network_share_cpu",
                "non_network_share_range", "rounds"):
        assert key in paddle, key
    for key in ("network_s", "train_step_s", "loading_work_s", "network_cpu_s", "train_step_cpu_s",
                "non_network_share", "non_network_share_cpu", "non_network_share_range", "rounds"):
        assert key in mmdet, key
    assert paddle["non_network_share"] == pytest.approx(1 - 9.25 / 10.25)
    assert mmdet["non_network_share"] == pytest.approx(0.3)
    assert len(paddle["rounds"]) == len(mmdet["rounds"]) == 2
    assert report["first_step_loss_rel_diff"] == pytest.approx(1e-6, rel=1e-3)
    json.dumps(report)  # the document is plain JSON


def test_summary_is_one_line_with_both_sides():
    line = summary_line(_report(), "reports/bench_overhead.json")
    assert "\n" not in line
    assert "paddle" in line and "mmdet" in line and "reports/bench_overhead.json" in line
    assert "non-network 9.8% (rounds 9.5..10.0%, CPU time 27.8%)" in line
    assert "non-network 30.0% (rounds 30.0..30.0%, CPU time 30.0%)" in line
    assert "2x1216x800" in line  # the batch tensor as WxH


def test_options_default_to_the_coco_setting():
    args = parse_args([])
    assert args.size == (1333, 800) and args.batch == 2 and args.repeats >= 1 and args.num_workers == 2
    assert parse_args(["--size", "160x96", "--repeats", "1"]).size == (160, 96)


@pytest.mark.parametrize("argv, named", [
    (["--repeats", "0"], "--repeats"), (["--batch", "0"], "--batch"), (["--num-workers", "-1"], "--num-workers"),
    (["--threads", "-2"], "--threads"), (["--size", "1333"], "--size"), (["--size", "16x16"], "--size"),
])
def test_bad_options_stop_with_the_option_named(argv, named, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2
    assert named in capsys.readouterr().err


def test_repeated_batch_gives_the_same_keys_each_time():
    sampler = RepeatedBatch([(3, 0, 0), (5, 0, 0)], 3)
    assert len(sampler) == 3
    assert list(sampler) == [[(3, 0, 0), (5, 0, 0)]] * 3


@pytest.mark.slow
def test_small_run_times_both_sides(tmp_path):
    out = tmp_path / "bench_overhead.json"
    proc = subprocess.run([sys.executable, "-m", "bench.overhead", "--size", "160x96", "--repeats", "1",
                           "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    report = json.loads(out.read_text())
    for side, times in (("paddle", ("network_s", "iteration_s", "step_s", "loading_work_s", "network_cpu_s",
                                    "iteration_cpu_s")),
                        ("mmdet", ("network_s", "train_step_s", "loading_work_s", "network_cpu_s",
                                   "train_step_cpu_s"))):
        assert len(report[side]["rounds"]) == 1
        for key in times:
            value = report[side][key]
            assert math.isfinite(value) and value > 0, (side, key, value)
        for key in ("non_network_share", "non_network_share_cpu"):
            assert math.isfinite(report[side][key]), (side, key)
    assert report["paddle"]["data_wait_s"] >= 0
    assert report["batch"]["batch_input_shape"] == [96, 160]
    # Same weights and images on both sides: the first training step's losses agree.
    assert report["first_step_loss_rel_diff"] < 1e-4
