"""Data parallel on CPU: 2 launched processes x 2 images against the single-process emulation.

Runs ``python -m bench.data_parallel --iters 2`` as a real process (so that the
emulation computes with the same CPU settings as the launched workers, fixed
before Paddle is imported) on its tiny COCO at 128x96: about a minute on two
CPU cores. See ``bench/data_parallel.py`` for what (a), (b), (c) and the
control are.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT  # noqa: E402

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow
TOLERANCE = 1e-5  # bench.data_parallel.TOLERANCE, without importing Paddle into this process


def _bench(tmp: Path, *extra: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / "data_parallel.json"
    proc = subprocess.run([sys.executable, "-m", "bench.data_parallel", "--work-dir", str(tmp / "work"),
                           "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, out


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("data_parallel")
    proc, out = _bench(tmp, "--iters", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_match_the_averaged_emulation(report):
    """(a) 2 processes equals (b) per-rank losses + averaged gradients: losses, gradient norms,
    weights, momentum and both ranks' GHM buffers, within float32 rounding."""
    ab = report["a_vs_b"]
    assert ab["tolerance"] == TOLERANCE
    assert ab["lr_equal"]
    assert ab["max_rel_any"] <= TOLERANCE, ab
    for row in ab["per_iteration"]:
        for key in ("loss_rel", "loss_cls_rel", "loss_bbox_rel", "grad_norm_rel"):
            assert row[key] <= TOLERANCE, (row["iter"], key, row[key])
    assert ab["params"]["tensors"] > 100 and ab["params"]["update_norm"] > 0, "training moved the weights"
    assert ab["params"]["rel_to_update"] <= TOLERANCE
    assert len(ab["ghm_per_rank"]) == 2
    for rank in ab["ghm_per_rank"]:
        assert rank["max_rel"] <= TOLERANCE
    # The two processes kept different GHM statistics (no buffer synchronisation).
    assert not ab["b_ghm_rank0_vs_rank1"]["bit_identical"]
    for row in report["iterations"]:
        assert row["a_distributed_rank0"]["param_rank_spread"] == 0.0, "ranks hold different weights"
        rank0, rank1 = row["keys_per_rank"]
        assert not {k[0] for k in rank0} & {k[0] for k in rank1}, "the ranks must see different images"
        assert len({tuple(k[1:]) for k in rank0 + rank1}) == 1, "same epoch and batch position"


def test_summed_gradients_would_be_detected(report):
    """Without the average the first gradient norm doubles and the weights leave the tolerance."""
    assert report["ok"]
    first = report["iterations"][0]
    # Same starting weights: the summed gradient is exactly twice the averaged one.
    assert first["control_summed_grad_norm"] == pytest.approx(2 * first["a_distributed_rank0"]["grad_norm"],
                                                              rel=1e-6)
    control = report["a_vs_control_summed_gradients"]
    assert control["max_rel_any"] > 100 * TOLERANCE
    assert control["params"]["rel_to_update"] > 0.1


def test_batch_of_four_differs_by_the_per_process_statistics(report):
    """(c) 1 x 4 images is reported, and differs: GHM statistics are per process."""
    ac = report["a_vs_c"]
    first = ac["loss_rel_per_iteration"][0]
    assert first["loss"] > TOLERANCE, "same weights, different GHM statistics: the losses differ"
    assert ac["params"]["rel_to_update"] > TOLERANCE


def test_launcher_failure_is_reported(tmp_path):
    """A launched run that does not finish gives exit status 1, names the logs, writes no report."""
    proc, out = _bench(tmp_path, "--iters", "1", "--timeout", "1", timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "workerlog.0" in proc.stderr and "launch.out" in proc.stderr
    assert not out.exists()
