"""``--keep-checkpoints K``: only the last K ``epoch_E.pdparams`` of a run stay; resuming still works.

The pruning rule is checked on a folder of placeholder files; the option in a
real ``python -m paddle_impl.train`` run (in-process, through ``main``) on a
tiny synthetic COCO of 2 training images, so that an epoch is one iteration.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from paddle_impl.engine import checkpoint as ckpt
from paddle_impl.train import main as train_main
from paddle_impl.train import parse_args


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _folder(tmp_path: Path, epochs) -> Path:
    for name in [*(f"epoch_{e}.pdparams" for e in epochs), "latest.ckpt", "model_final.pdparams",
                 "epoch_best.pdparams", "epoch_1.pdparams.tmp", "log.jsonl"]:
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_the_last_k_epoch_files_stay(tmp_path):
    """After epoch 5 with K=2: epochs 1-3 go; 4, 5, a later epoch's file and every other file stay."""
    folder = _folder(tmp_path, [1, 2, 3, 4, 5, 10])
    removed = ckpt.prune_epoch_weights(folder, newest_epoch=5, keep=2)
    assert [p.name for p in removed] == ["epoch_1.pdparams", "epoch_2.pdparams", "epoch_3.pdparams"]
    assert _names(folder) == ["epoch_1.pdparams.tmp", "epoch_10.pdparams", "epoch_4.pdparams",
                              "epoch_5.pdparams", "epoch_best.pdparams", "latest.ckpt", "log.jsonl",
                              "model_final.pdparams"]
    # Nothing older than K epochs: nothing to do.
    assert ckpt.prune_epoch_weights(folder, newest_epoch=5, keep=2) == []


def test_zero_keeps_every_epoch_file(tmp_path):
    folder = _folder(tmp_path, [1, 2, 3])
    before = _names(folder)
    assert ckpt.prune_epoch_weights(folder, newest_epoch=3, keep=0) == []
    assert _names(folder) == before
    with pytest.raises(ValueError, match="keep must be >= 0"):
        ckpt.prune_epoch_weights(folder, newest_epoch=3, keep=-1)


def test_option_default_and_bad_value(tmp_path, capsys):
    assert parse_args(["--work-dir", str(tmp_path)]).keep_checkpoints == 3
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--work-dir", str(tmp_path / "w"), "--keep-checkpoints", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("argument --keep-checkpoints: expected an integer >= 0, got '-1'"), err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_training_keeps_the_last_k_and_resumes(tmp_path):
    """3 epochs with K=2 leave epochs 2 and 3; the resumed 4th epoch removes 2 and continues from 3."""
    from paddle_impl.data.tiny_coco import generate

    coco = generate(tmp_path / "coco", train=2, val=1, seed=0, size=(128, 192))
    work = tmp_path / "work"
    args = ["--coco", str(coco), "--work-dir", str(work), "--scale", "128x96", "--num-workers", "0",
            "--no-progress", "--seed", "0", "--batch-size", "2", "--epochs", "4", "--eval-interval", "0",
            "--keep-checkpoints", "2"]
    assert train_main([*args, "--max-iters", "3"]) == 0
    epoch_files = lambda: sorted(p.name for p in work.glob("epoch_*.pdparams"))  # noqa: E731
    assert epoch_files() == ["epoch_2.pdparams", "epoch_3.pdparams"]
    assert (work / "model_final.pdparams").is_file()
    assert ckpt.load_checkpoint(work / "latest.ckpt")["iter"] == 3

    assert train_main([*args, "--resume"]) == 0
    assert epoch_files() == ["epoch_3.pdparams", "epoch_4.pdparams"]
    state = ckpt.load_checkpoint(work / "latest.ckpt")
    assert state["iter"] == 4 and state["run"]["resumed_from"] == str(work / "latest.ckpt")
    assert [json.loads(line)["iter"] for line in open(work / "log.jsonl")] == [1, 2, 3, 4]
    assert (work / "model_final.pdparams").is_file()
