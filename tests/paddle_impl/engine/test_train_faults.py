"""Data, disk and numeric faults of a training run: one named line, exit 2, nothing trained lost.

Real ``python -m paddle_impl.train`` processes (for the exit status, the
resource limits and a timeout that turns a hang into a failure) on a tiny
synthetic COCO at 128x96: 4 training images, so an epoch is 2 iterations.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paddle_impl.engine import checkpoint as ckpt
from paddle_impl.data.tiny_coco import generate
from paddle_impl.train import main as train_main

from tests.paths import ROOT  # noqa: E402

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow
COMMON = ["--scale", "128x96", "--no-progress", "--seed", "0"]
TIMEOUT = 600


@pytest.fixture
def coco(tmp_path) -> Path:
    return generate(tmp_path / "coco", train=4, val=2, seed=0, size=(128, 192))


def train(coco: Path, work: Path, *extra: str, workers: int = 0, limit_file_size: int | None = None
          ) -> subprocess.CompletedProcess:
    def limits() -> None:
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, "-m", "paddle_impl.train", "--coco", str(coco),
                           "--work-dir", str(work), *COMMON, "--num-workers", str(workers), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=limits)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def logged_iters(work: Path) -> list[int]:
    path = work / "log.jsonl"
    return [json.loads(line)["iter"] for line in open(path)] if path.is_file() else []


def image_path(coco: Path, split: str, index: int = 0) -> tuple[Path, int]:
    data = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
    image = data["images"][index]
    return coco / split / image["file_name"], image["id"]


def test_missing_images_are_listed_before_training(coco, tmp_path, capsys):
    first, first_id = image_path(coco, "train2017", 0)
    val, val_id = image_path(coco, "val2017", 1)
    first.unlink()
    val.unlink()
    work = tmp_path / "work"
    assert train_main(["--coco", str(coco), "--work-dir", str(work), *COMMON, "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.strip()][-1]
    assert line.startswith("error: 2 image file(s)"), err
    assert f"{first} (image id {first_id})" in line and f"{val} (image id {val_id})" in line
    assert not work.exists(), "nothing is written for bad input"


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_mid_training_stops_named_and_resumes(coco, tmp_path, workers):
    work = tmp_path / "work"
    done = train(coco, work, "--max-iters", "2", workers=workers)
    assert done.returncode == 0, done.stderr[-3000:]

    # Every training image broken: the next epoch fails on its first batch.
    broken = {}
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    for image in data["images"]:
        path = coco / "train2017" / image["file_name"]
        broken[path] = path.read_bytes()
        path.write_bytes(b"not an image")
    proc = train(coco, work, "--max-iters", "4", "--resume", workers=workers)
    line = error_line(proc)
    assert "cannot decode the image" in line and "(image id " in line, line
    assert any(str(path) in line for path in broken), line
    state = ckpt.load_checkpoint(work / "latest.ckpt")
    assert state["iter"] == 2 == logged_iters(work)[-1]

    for path, data in broken.items():
        path.write_bytes(data)
    resumed = train(coco, work, "--max-iters", "4", "--resume", workers=workers)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_iters(work) == [1, 2, 3, 4]


def test_a_fault_in_one_image_mid_epoch_saves_the_iterations_before_it(coco, tmp_path):
    """One bad image: the iterations before its batch are saved and resume continues from them."""
    work = tmp_path / "work"
    # Which batch holds image 0 follows from the seeded sampler; try each image
    # until the fault lands in the second batch of the epoch.
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    for image in data["images"]:
        path = coco / "train2017" / image["file_name"]
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 3])  # truncated
        proc = train(coco, work, "--max-iters", "2", "--ckpt-interval-iters", "0")
        if proc.returncode == 2 and logged_iters(work) == [1]:
            line = error_line(proc)
            assert str(path) in line and f"image id {image['id']}" in line, line
            assert ckpt.load_checkpoint(work / "latest.ckpt")["iter"] == 1
            path.write_bytes(original)
            resumed = train(coco, work, "--max-iters", "2", "--resume")
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert logged_iters(work) == [1, 2]
            return
        path.write_bytes(original)
    pytest.fail("no image of the training set lands in the second batch")


def test_evaluation_fault_keeps_the_epoch(coco, tmp_path):
    val, val_id = image_path(coco, "val2017", 0)
    val.write_bytes(b"\x89PNG broken")
    work = tmp_path / "work"
    proc = train(coco, work, "--max-iters", "2")
    line = error_line(proc)
    assert str(val) in line and f"image id {val_id}" in line, line
    assert ckpt.load_checkpoint(work / "latest.ckpt")["iter"] == 2
    assert (work / "epoch_1.pdparams").is_file()


def test_output_folders_are_checked_before_training(coco, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["--work-dir", str(blocker / "work")], f"--work-dir {blocker / 'work'}: its parent {blocker} is not a folder"),
        (["--work-dir", str(blocker)], f"--work-dir {blocker}: is a file, not a folder"),
        (["--work-dir", str(tmp_path / "w"), "--reports", str(blocker)], f"--reports {blocker}: is a file"),
        (["--work-dir", "/proc/ghm-work"], "--work-dir /proc/ghm-work: not writable"),
    ]
    for args, expected in cases:
        assert train_main(["--coco", str(coco), *COMMON, "--num-workers", "0", *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        line = [x for x in err.splitlines() if x.strip()][-1]
        assert line.startswith(f"error: {expected}"), (line, expected)
    assert not (tmp_path / "w").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(coco, tmp_path):
    work = tmp_path / "work"
    first = train(coco, work, "--max-iters", "1", "--eval-interval", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (work / "latest.ckpt").read_bytes()
    # A file-size limit below a checkpoint's size: the next checkpoint write fails.
    proc = train(coco, work, "--max-iters", "2", "--eval-interval", "0", "--resume",
                 limit_file_size=4 << 20)
    line = error_line(proc)
    assert f"{work / 'latest.ckpt'}: cannot write (File too large)" in line, line
    assert (work / "latest.ckpt").read_bytes() == before
    assert not [p.name for p in work.iterdir() if p.name.endswith(".tmp")]


def test_stale_temporary_files_are_removed_on_start(coco, tmp_path):
    work = tmp_path / "work"
    first = train(coco, work, "--max-iters", "1", "--eval-interval", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    # What a SIGKILL in the middle of a checkpoint write leaves behind.
    stale = work / ".latest.ckpt.k3j9x2aq.tmp"
    stale.write_bytes((work / "latest.ckpt").read_bytes()[:1000])
    resumed = train(coco, work, "--max-iters", "2", "--eval-interval", "0", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not stale.exists()
    assert "removed 1 temporary file" in resumed.stderr


def test_non_finite_loss_stops_without_saving_it(coco, tmp_path):
    work = tmp_path / "work"
    # An absurd learning rate: the first update is finite, the next forward overflows.
    proc = train(coco, work, "--max-iters", "4", "--lr", "1e30", "--warmup-iters", "1",
                 "--ckpt-interval-iters", "1", "--eval-interval", "0")
    line = error_line(proc)
    assert "iteration " in line and (" is nan" in line or " is inf" in line), line
    assert "loss_cls" in line or "loss_bbox" in line or "gradient norm" in line, line
    failed = int(line.split("iteration ")[1].split(":")[0])
    state = ckpt.load_checkpoint(work / "latest.ckpt")
    assert state["iter"] == failed - 1
    assert all(np.isfinite(v).all() for v in state["model"].values())
