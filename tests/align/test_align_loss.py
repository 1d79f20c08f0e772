"""The loss stage end to end on a small batch: verdict, files, and that a wrong piece is caught."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.loss.stage import LossOptions, first_divergence, run_loss
from paddle_impl.boxes.assigner import MaxIoUAssigner

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow

SMALL = "2x3x128x192"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("build")


def test_loss_stage_passes_over_twenty_ghm_calls(build_dir, tmp_path):
    result = run_loss(LossOptions(shape=SMALL, iters=4, reports=tmp_path, build_dir=build_dir))
    failed = [(t.name, t.reason) for t in result.tensors if not t.passed]
    assert result.passed, failed[:5]
    names = {t.name for t in result.tensors}
    assert {"targets.P3.labels", "targets.P7.bbox_targets", "targets.num_pos",
            "ghmc.call19.acc_sum", "ghmr.call19.bin_counts", "iter3.loss.total"} <= names
    assert result.meta["positives_per_image"][1] == 0  # the image without boxes
    assert result.meta["positives_per_image"][0] > 0
    for name in ("loss_paddle.npy", "loss_torch.npy", "loss_diff.log", "loss.json", "loss.html"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "loss.json").read_text())["passed"] is True


def test_wrong_assignment_threshold_is_caught_at_the_targets(build_dir, tmp_path, monkeypatch):
    original = MaxIoUAssigner.from_config.__func__

    def loose(cls, cfg=None):
        assigner = original(cls, cfg)
        assigner.pos_iou_thr = 0.45
        return assigner

    monkeypatch.setattr(MaxIoUAssigner, "from_config", classmethod(loose))
    result = run_loss(LossOptions(shape=SMALL, iters=1, reports=tmp_path, build_dir=build_dir))
    assert not result.passed
    assert first_divergence(result).startswith("targets.")
