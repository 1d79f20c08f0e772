"""The environment `make setup` leaves: consistent, with mmcv's compiled ops, nothing of the mmcv build left."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_pip_check_finds_no_conflict():
    # mmcv is built with a setuptools older than torch accepts; that setuptools must never
    # reach the environment the project runs in.
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("No broken requirements found."), done.stdout + done.stderr


def test_mmcv_has_its_compiled_ops_and_the_build_environment_is_gone():
    from mmcv.ops import nms  # noqa: F401 (the compiled extension loads)

    venv = Path(sys.prefix)
    assert not (venv / ".mmcv-build-env").exists() and not (venv / ".mmcv-wheel").exists()
