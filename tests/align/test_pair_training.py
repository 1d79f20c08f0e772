"""`python -m align.backward --torch ... --paddle ...`: any pair trained in lockstep, every step compared."""
from __future__ import annotations

import json

import pytest

from align.backward.__main__ import main as backward_main

BLOCK = ["--torch", "tests.align.pair_builders:block_torch", "--paddle", "tests.align.pair_builders:block_paddle",
         "--shape", "2x3x16x16", "--steps", "3"]


def run(tmp_path, argv) -> tuple[int, dict]:
    status = backward_main(argv + ["--reports", str(tmp_path)])
    report = tmp_path / "pair_backward.json"
    return status, json.loads(report.read_text()) if report.is_file() else {}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_pair_trains_in_lockstep_and_agrees(tmp_path, dtype):
    status, report = run(tmp_path, BLOCK + ["--dtype", dtype])
    assert status == 0, [t for t in report["tensors"] if not t["passed"]][:3]
    names = [t["name"] for t in report["tensors"]]
    assert names[0] == "step1.loss" and "step1.grad.conv1.weight" in names and "step1.grad.fc.weight" in names
    assert "step3.grad_norm" in names and "final.param.fc.weight" in names and "final.momentum.bn2.bias" in names
    assert report["meta"]["dtype"] == dtype and report["meta"]["steps"] == 3
    assert (tmp_path / "pair_backward_diff.log").is_file() and (tmp_path / "pair_backward.html").is_file()


def test_a_wrong_backward_fails_at_the_first_gradients(tmp_path):
    argv = list(BLOCK)
    argv[3] = "tests.align.pair_builders:block_paddle_wrong_backward"
    status, report = run(tmp_path, argv)
    assert status == 1
    first = next(t["name"] for t in report["tensors"] if not t["passed"])
    assert first.startswith("step1.grad.")


def test_clipping_applies_on_both_sides(tmp_path):
    status, report = run(tmp_path, BLOCK + ["--clip-max-norm", "1e-3"])
    assert status == 0
    rows = {t["name"]: t for t in report["tensors"]}
    assert rows["step2.loss"]["passed"] and rows["final.param.conv1.weight"]["passed"]


def test_the_pair_options_are_checked(tmp_path, capsys):
    assert backward_main(["--torch", "tests.align.pair_builders:block_torch", "--reports", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --torch and --paddle come together: each names the builder of one side"]
    assert backward_main(["--map", "names.json", "--reports", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --map is for a pair of --torch and --paddle builders"]
    assert not any(tmp_path.iterdir())


def test_a_missing_weight_decay_on_the_paddle_side_is_caught_in_float64(tmp_path, monkeypatch):
    from align.backward import any_pair as training

    real = training.PaddleTraining.__init__

    def without_decay(self, model, *, weight_decay, **kw):
        real(self, model, weight_decay=0.0, **kw)

    monkeypatch.setattr(training.PaddleTraining, "__init__", without_decay)
    status, report = run(tmp_path, BLOCK)
    assert status == 1
    assert any(t["name"].startswith("final.") and not t["passed"] for t in report["tensors"])


def test_the_torch_side_is_replayed_from_the_cache_and_a_fault_is_still_caught(tmp_path, monkeypatch):
    cached = BLOCK + ["--cache", "--build-dir", str(tmp_path / "build")]
    status, first = run(tmp_path / "r1", cached)
    assert status == 0 and first["meta"]["reference_cache"] == "miss"
    status, second = run(tmp_path / "r2", cached)
    assert status == 0 and second["meta"]["reference_cache"] == "hit"
    assert [(t["name"], t["max_abs"]) for t in second["tensors"]] == [(t["name"], t["max_abs"]) for t in first["tensors"]]

    from align.backward import any_pair

    real = any_pair.PaddleTraining.__init__
    monkeypatch.setattr(any_pair.PaddleTraining, "__init__",
                        lambda self, model, *, weight_decay, **kw: real(self, model, weight_decay=0.0, **kw))
    status, faulty = run(tmp_path / "r3", cached)
    assert status == 1 and faulty["meta"]["reference_cache"] == "hit"
