"""``python -m paddle_impl.train``'s command line: options rejected before anything runs or is written."""
from __future__ import annotations

import subprocess
import sys

from paddle_impl.evaluation.coco_eval import EVAL_BACKENDS
from paddle_impl.train import main as train_main
from tests.paths import ROOT


def test_unknown_eval_backend_is_one_line_and_exit_2(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "paddle_impl.train", "--work-dir", str(work),
                           "--eval-backend", "cocoapi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--eval-backend" in lines[0] and "'cocoapi'" in lines[0]
    assert all(backend in lines[0] for backend in EVAL_BACKENDS)
    assert not work.exists()


def test_eval_backend_choices_are_in_the_help(capsys):
    try:
        train_main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    assert "--eval-backend {pycocotools,faster-coco-eval}" in " ".join(capsys.readouterr().out.split())
