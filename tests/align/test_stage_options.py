"""Every stage checks its options before any work: a bad value is one line naming the option and
the value, exit status 2, and nothing is written (no checkpoint, no report)."""
from __future__ import annotations

import importlib

import pytest

# (stage, arguments, what the error line must name)
BAD_OPTIONS = [
    ("forward", ["--seed", "-1"], ["--seed", "'-1'"]),
    ("forward", ["--shape", "2x3x800"], ["--shape", "'2x3x800'"]),
    ("forward", ["--shape", "2x4x64x64"], ["--shape", "'2x4x64x64'"]),
    ("forward", ["--perturb-scale", "0"], ["--perturb-scale", "'0'"]),
    ("forward", ["--rel-tol", "nan"], ["--rel-tol", "'nan'"]),
    ("forward", ["--mean-tol=-1e-5"], ["--mean-tol", "'-1e-5'"]),
    ("loss", ["--seed", "-1"], ["--seed", "'-1'"]),
    ("loss", ["--iters", "0"], ["--iters", "'0'"]),
    ("loss", ["--loss-rel-tol", "x"], ["--loss-rel-tol", "'x'"]),
    ("backward", ["--seed", "-1"], ["--seed", "'-1'"]),
    ("backward", ["--steps", "0"], ["--steps", "'0'"]),
    ("backward", ["--lr", "-0.01"], ["--lr", "'-0.01'"]),
    ("backward", ["--clip-max-norm", "inf"], ["--clip-max-norm", "'inf'"]),
    ("backward", ["--iters-per-epoch", "-1"], ["--iters-per-epoch", "'-1'"]),
    ("backward", ["--warmup-iters", "two"], ["--warmup-iters", "'two'"]),
    ("data", ["--seed", "-1"], ["--seed", "'-1'"]),
    ("data", ["--batch-size", "0"], ["--batch-size", "'0'"]),
    ("data", ["--scale", "10x10"], ["--scale", "'10x10'"]),
    ("data", ["--input-atol", "-1"], ["--input-atol", "'-1'"]),
    ("predict", ["--score-thr", "1.5"], ["--score-thr", "'1.5'"]),
    ("predict", ["--scale", "wide"], ["--scale", "'wide'"]),
    ("predict", ["--box-atol", "-1"], ["--box-atol", "'-1'"]),
    ("metric", ["--seed", "-3"], ["--seed", "'-3'"]),
    ("train", ["--iters", "0"], ["--iters", "'0'"]),
    ("train", ["--lr", "0"], ["--lr", "'0'"]),
    ("train", ["--scale", "0x0"], ["--scale", "'0x0'"]),
    ("train", ["--warmup-iters", "-2"], ["--warmup-iters", "'-2'"]),
    ("pair", ["--seed", "-1"], ["--seed", "'-1'"]),
    ("pair", ["--shape", "7"], ["--shape", "'7'"]),
    ("pair", ["--rel-tol", "-1"], ["--rel-tol", "'-1'"]),
]
PAIR = ["--torch", "tests.align.pair_builders:block_torch", "--paddle", "tests.align.pair_builders:block_paddle"]


@pytest.mark.parametrize("stage, argv, named", BAD_OPTIONS, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD_OPTIONS])
def test_a_bad_option_is_refused_by_name_before_any_work(tmp_path, capsys, stage, argv, named):
    main = importlib.import_module(f"align.{stage}.__main__").main
    outputs = ["--reports", str(tmp_path / "reports"), "--build-dir", str(tmp_path / "build")]
    try:
        status = main((PAIR if stage == "pair" else []) + argv + outputs)
    except SystemExit as stopped:  # argparse: its usage block, then the line
        status = stopped.code
    assert status == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"python -m align.{stage}: error: argument {named[0]}") \
        or line.startswith(f"error: {named[0]} {named[1][1:-1]}:"), line
    assert all(word.strip("'") in line for word in named), line
    assert not any(tmp_path.iterdir())


def test_a_perturbation_of_no_parameter_is_refused_before_the_checkpoint_is_made(tmp_path, capsys):
    from align.forward.__main__ import main

    status = main(["--perturb", "backbone.layer3.2.conv9.weight", "--shape", "1x3x64x64",
                   "--reports", str(tmp_path / "reports"), "--build-dir", str(tmp_path / "build")])
    assert status == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --perturb backbone.layer3.2.conv9.weight: no parameter named")
    assert "backbone.layer3.2.conv2.weight" in line  # the closest names
    assert not any(tmp_path.iterdir())


def test_a_loss_batch_of_another_size_is_refused_by_name_before_any_work(tmp_path, capsys):
    from align.loss.__main__ import main

    status = main(["--shape", "3x3x64x64", "--reports", str(tmp_path / "reports"),
                   "--build-dir", str(tmp_path / "build")])
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --shape 3x3x64x64: the loss stage's fake batch has 2 images, not 3"]
    assert not any(tmp_path.iterdir())
