"""``bench.bench_ghm``: its rows and their columns, on inputs of a few anchors (no figure is judged)."""
from __future__ import annotations

import numpy as np
import pytest

from bench.bench_ghm import (HEADER, elementwise_error, format_row, level_inputs, measure,
                             timed_passes)
from bench.machine import alternating_medians_ms
from paddle_impl.model import ghm_chunks


def _tiny_level(seed=0):
    return level_inputs(np.random.default_rng(seed), 2, 3)


def test_runs_take_turns_call_by_call():
    order = []
    medians = alternating_medians_ms([lambda: order.append("a"), lambda: order.append("b")], repeats=3)
    assert order == ["a", "b"] * 4
    assert len(medians) == 2 and all(m >= 0 for m in medians)


def test_timed_passes_restores_the_pass_runner():
    run = ghm_chunks.run
    spent = []
    with timed_passes(spent):
        assert ghm_chunks.run([].append, [1, 2], parallel=False) == [None, None]
    assert ghm_chunks.run is run and len(spent) == 1


@pytest.mark.parametrize("kind", ["cls", "box"])
def test_elementwise_error_is_small_for_ours(kind):
    errors = elementwise_error(kind, _tiny_level()[kind])
    assert set(errors) == {"mmdet", "paddle"}
    assert 0 <= errors["paddle"] < 1e-6


@pytest.mark.parametrize("kind", ["cls", "box"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_a_row_has_its_columns(kind, mode):
    levels = [_tiny_level(1)[kind], _tiny_level(2)[kind]]
    errors = [elementwise_error(kind, level) for level in levels]
    row = measure(kind, mode, ["P6", "P7"], levels, repeats=1, errors=errors)
    assert row["mode"] == mode and row["levels"] == ["P6", "P7"]
    assert row["elements"] == sum(level[0].size for level in levels)
    assert row["speedup"] == pytest.approx(row["mmdet_ms"] / row["paddle_ms"])
    assert 0 <= row["passes_share"] <= 1
    assert row["max_relative_loss_difference"] < 1e-5
    assert row["max_relative_acc_sum_difference"] == 0
    assert len(row["loss_values"]) == 2
    line = format_row(row)
    assert line.startswith("GHM-") and "P3-P7" in line
    assert len(line.split()) == 11 and len(line) <= len(HEADER) + 2


def test_timed_passes_times_the_host_steps_and_restores_them():
    from bench.bench_ghm import ELEMENTWISE_STEPS
    from paddle_impl.model import ghm_host

    originals = [getattr(owner, name) for owner, name in ELEMENTWISE_STEPS]
    spent = []
    logits, labels, weights = _tiny_level()["cls"]
    with timed_passes(spent):
        import paddle
        from paddle_impl.model.ghm_loss import GHMC
        GHMC()(paddle.to_tensor(logits), paddle.to_tensor(labels), paddle.to_tensor(weights))
    assert ghm_host.takes_size(logits.size)
    # ghmc_arrays, byte_ids and weighted_loss of the one call on the host path.
    assert len(spent) == 3
    assert [getattr(owner, name) for owner, name in ELEMENTWISE_STEPS] == originals
