"""Resuming under another training configuration: refused by option name, or continued and recorded.

Runs ``python -m paddle_impl.train`` in-process (``main`` returns the exit
status) on a tiny synthetic COCO at 128x96: the training set keeps 10 of its
12 images, so an epoch is 5 iterations of 2 images or 3 of 4. Every test
resumes its own copy of one run stopped after iteration 4, in the middle of
its first epoch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from paddle_impl.engine import checkpoint as ckpt
from paddle_impl.engine.lr_schedule import WarmupMultiStepLR
from paddle_impl.config import get_config
from paddle_impl.data.tiny_coco import generate
from paddle_impl.train import main as train_main

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow
COMMON = ["--num-workers", "0", "--no-progress", "--eval-interval", "0"]
RECORDS = ("latest.ckpt", "run.json", "log.jsonl", "eval.jsonl")


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "coco", train=12, val=2, seed=0, size=(128, 192))


@pytest.fixture(scope="module")
def stopped(coco, tmp_path_factory) -> Path:
    """A run of 4 iterations at --scale 128x96 --seed 0 --batch-size 2 (the default)."""
    work = tmp_path_factory.mktemp("stopped") / "work"
    assert train_main(["--coco", str(coco), "--work-dir", str(work), *COMMON,
                       "--scale", "128x96", "--seed", "0", "--max-iters", "4"]) == 0
    return work


@pytest.fixture
def work(stopped, tmp_path) -> Path:
    """This test's copy of the stopped run (its records, not its weight files)."""
    copy = tmp_path / "work"
    copy.mkdir()
    for name in RECORDS:
        shutil.copy2(stopped / name, copy / name)
    return copy


def resume(coco: Path, work: Path, *options: str) -> int:
    return train_main(["--coco", str(coco), "--work-dir", str(work), *COMMON, "--resume", *options])


def run_json(work: Path) -> dict:
    return json.loads((work / "run.json").read_text())


def test_a_changed_configuration_is_refused_naming_each_option(coco, work, capsys):
    before = {path.name: path.read_bytes() for path in work.iterdir()}
    capsys.readouterr()
    status = resume(coco, work, "--scale", "160x128", "--seed", "1", "--batch-size", "4", "--max-iters", "5")
    err = capsys.readouterr().err
    assert status == 2
    assert err.splitlines() == [
        f"error: --resume {work / 'latest.ckpt'}: the run was trained with --batch-size 2 --lr 0.00125 "
        "--scale 128x96 --seed 0; this command has --batch-size 4 --lr 0.0025 --scale 160x128 --seed 1 "
        "(pass --allow-config-change to continue with the new values)"], err
    assert {path.name: path.read_bytes() for path in work.iterdir()} == before, "nothing is written"


def test_the_same_command_resumes_with_defaults_spelled_out(coco, work, capsys):
    """Defaults spelled out, and options that only change when training stops, what is kept or how
    it is evaluated, are the same configuration."""
    capsys.readouterr()
    status = resume(coco, work, "--scale", "128x96", "--seed", "0", "--max-iters", "5",
                    "--epochs", "12", "--batch-size", "2", "--lr", "auto", "--warmup-iters", "500",
                    "--milestones", "8,11", "--keep-checkpoints", "1", "--ckpt-interval-iters", "7",
                    "--eval-backend", "faster-coco-eval")
    err = capsys.readouterr().err
    assert status == 0, err
    assert "trained with" not in err
    assert ckpt.load_checkpoint(work / "latest.ckpt")["iter"] == 5
    assert run_json(work)["config_changes"] == []


@pytest.fixture
def changed_twice(coco, work, capsys) -> tuple[Path, str]:
    """Resumed at iteration 4 with a larger batch and another scale, then at 5 with another seed
    and the first scale back, each time with --allow-config-change."""
    assert resume(coco, work, "--scale", "160x128", "--seed", "0", "--batch-size", "4", "--max-iters", "5",
                  "--allow-config-change") == 0
    assert resume(coco, work, "--scale", "128x96", "--seed", "1", "--batch-size", "4", "--max-iters", "6",
                  "--allow-config-change") == 0
    return work, capsys.readouterr().err


def test_an_allowed_change_continues_under_the_new_values(changed_twice):
    work, err = changed_twice
    assert "continuing at iteration 4 with --batch-size 4" in err, err
    log = [json.loads(line) for line in open(work / "log.jsonl")]
    assert [r["iter"] for r in log] == [1, 2, 3, 4, 5, 6]
    # Batch 4 of an epoch that, with 4 images a batch, has 3: the next epoch begins.
    assert [(r["epoch"], r["iter_in_epoch"]) for r in log[4:]] == [(2, 1), (2, 2)]
    # The schedule continues at iteration 4 (0-based) of a schedule for 4 images a batch.
    schedule = WarmupMultiStepLR.from_config(3, 4, cfg=get_config())
    assert [r["lr"] for r in log[4:]] == [schedule.lr_at(4), schedule.lr_at(5)]
    state = ckpt.load_checkpoint(work / "latest.ckpt")
    assert state["iter"] == 6 and state["sampler"] == {"epoch": 1, "batch": 2}
    assert state["config"]["--scale"] == "128x96" and state["config"]["--seed"] == 1


def test_allowed_changes_are_recorded_in_run_json_and_the_report(changed_twice):
    work, _ = changed_twice
    expected = [
        {"iter": 4, "option": "--batch-size", "old": "2", "new": "4"},
        {"iter": 4, "option": "--lr", "old": "0.00125", "new": "0.0025"},
        {"iter": 4, "option": "--scale", "old": "128x96", "new": "160x128"},
        {"iter": 5, "option": "--scale", "old": "160x128", "new": "128x96"},
        {"iter": 5, "option": "--seed", "old": "0", "new": "1"},
    ]
    assert run_json(work)["config_changes"] == expected
    assert ckpt.load_checkpoint(work / "latest.ckpt")["config_changes"] == expected
    html = " ".join((work / "train.html").read_text().split())
    for change in expected:
        row = (f'<tr><td>{change["iter"]}</td><td class="key">{change["option"]}</td>'
               f'<td>{change["old"]}</td><td>{change["new"]}</td></tr>')
        assert row in html, row


def test_a_checkpoint_without_a_configuration_record_resumes(coco, work, capsys):
    state = ckpt.load_checkpoint(work / "latest.ckpt")
    del state["config"], state["config_changes"]
    ckpt.atomic_save(state, work / "latest.ckpt")
    capsys.readouterr()
    status = resume(coco, work, "--scale", "128x96", "--seed", "0", "--max-iters", "5")
    err = capsys.readouterr().err
    assert status == 0, err
    notes = [line for line in err.splitlines() if "does not record its training options" in line]
    assert notes == [f"--resume {work / 'latest.ckpt'}: the checkpoint does not record its training options "
                     "(written by an older version); resuming without comparing them with this command"], err
    resumed = ckpt.load_checkpoint(work / "latest.ckpt")
    assert resumed["iter"] == 5 and resumed["config"]["--scale"] == "128x96"
