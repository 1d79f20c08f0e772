"""Classifying the first disagreement of each step: the engine's rule and the GHM causes."""
from __future__ import annotations

import numpy as np
import pytest

from align.engine.divergence import Explanation, StepEvidence, classify, explained
from align.ghm.divergence import BIN_SCOPE, RELU_SCOPE, BinFlips, relu_flips, row_kind


def relu(count=3):
    return Explanation("ReLU mask flip", count, "in layer1.relu", RELU_SCOPE)


def test_a_cause_explains_what_its_scope_covers_and_everything_after():
    evidence = [StepEvidence(1, ["grad.conv1.weight", "step1.grad_norm"], [relu()]),
                StepEvidence(2, []),
                StepEvidence(3, ["step3.loss_cls.P3"])]
    out = classify(evidence, row_kind)
    assert [(d.step, d.row, d.verdict, d.cause) for d in out] == [
        (1, "grad.conv1.weight", "expected rounding", "ReLU mask flip"),
        (3, "step3.loss_cls.P3", "expected rounding", "propagated from step 1")]
    assert explained(out)


def test_a_loss_a_relu_flip_cannot_move_is_unexplained():
    # A flipped ReLU moves forward values by its own tiny magnitude only: a loss row
    # that disagrees in the same step needs another cause.
    out = classify([StepEvidence(1, ["step1.loss_cls.P3", "grad.x"], [relu()])], row_kind)
    assert out[0].verdict == "unexplained" and not explained(out)
    bins = Explanation("GHM bin flip", 1, "ghmc P3", BIN_SCOPE)
    assert explained(classify([StepEvidence(1, ["step1.loss_cls.P3"], [relu(), bins])], row_kind))


def test_a_cause_in_a_quiet_step_reaches_later_steps_but_nothing_reaches_an_lr():
    out = classify([StepEvidence(1, [], [relu()]), StepEvidence(2, ["step2.loss.total"])], row_kind)
    assert out[0].cause == "propagated from step 1"
    assert classify([StepEvidence(1, ["step1.lr"], [])], row_kind)[0].verdict == "unexplained"
    assert row_kind("iter003.lr") == "lr" and row_kind("param.fc.weight") == "state"
    assert row_kind("iter003.grad_norm") == "gradient" and row_kind("iter003.loss_bbox") == "loss"


def test_relu_flips_count_only_flips_within_rounding_of_zero():
    assert relu_flips({}) is None
    cause = relu_flips({"a.relu": [2, 3e-5, 4.0, np.array([0.5, 100.0])],
                        "b.relu": [5, 1e-4, 2.0, np.array([1.0, 2.0, 3.0, 200.0, 300.0])]})
    assert cause.count == 4 and "4 of 7 flipped elements within 64 float spacings" in cause.detail
    assert "most in b.relu (3)" in cause.detail and "closest is 1 spacings" in cause.detail
    # Flips far from zero are a consequence of an earlier difference, not a cause.
    assert relu_flips({"a.relu": [1, 1e-3, 4.0, np.array([5000.0])]}) is None


class FakeRecorder:
    def __init__(self, counts, g, valid, edges):
        self.counts, self.g, self._edges = counts, g, edges
        self.valid = valid

    def edges(self):
        return self._edges

    def clear_g(self):
        self.g.clear()


@pytest.mark.parametrize("keep_g", [True, False])
def test_bin_flips_list_the_elements_and_their_distance_to_the_edge(keep_g):
    edges = np.array([0.0, 0.5, 1.000001], np.float32)
    edge = np.float32(0.5)
    below = np.nextafter(edge, np.float32(0))  # one ulp below the edge: bin 0 on one side
    g_t = np.array([[0.1, below, 0.9]], np.float32)
    g_p = np.array([[0.1, edge, 0.9]], np.float32)
    valid = np.ones_like(g_t, bool)
    counts_t = [np.array([2, 1])] * 5
    counts_p = [np.array([1, 2])] + [np.array([2, 1])] * 4
    t = FakeRecorder(counts_t, {0: (g_t, valid)} if keep_g else {}, valid, edges)
    p = FakeRecorder(counts_p, {0: (g_p, valid)} if keep_g else {}, valid, edges)
    cause = BinFlips({"ghmc": (t, p)}).explanation(1)
    assert cause.kind == "GHM bin flip" and cause.count == 1 and cause.scope == BIN_SCOPE
    assert cause.detail.startswith("ghmc P3:")
    if keep_g:
        assert "(mmdet, bin 0)" in cause.detail and "(paddle, bin 1)" in cause.detail
        assert "1 ulps from edge 0.5" in cause.detail
    else:
        assert "bins [0, 1] differ" in cause.detail
    assert not t.g and not p.g
    assert BinFlips({"ghmc": (t, p)}).explanation(2) is None


def test_a_bin_flip_far_from_the_edge_is_no_cause():
    edges = np.array([0.0, 0.5, 1.000001], np.float32)
    g_t = np.array([[0.4999]], np.float32)  # about 1700 ulps below the edge
    g_p = np.array([[0.5001]], np.float32)
    valid = np.ones_like(g_t, bool)
    t = FakeRecorder([np.array([1, 0])] + [np.array([1, 1])] * 4, {0: (g_t, valid)}, valid, edges)
    p = FakeRecorder([np.array([0, 1])] + [np.array([1, 1])] * 4, {0: (g_p, valid)}, valid, edges)
    assert BinFlips({"ghmr": (t, p)}).explanation(1) is None


def test_a_replayed_recorder_explains_a_bin_flip_as_the_live_one_does(tmp_path):
    from align.engine.cache import ReferenceCache
    from align.ghm.recorders import RecordedGHM, recorded_calls

    edges = np.array([0.0, 0.5, 1.000001], np.float32)
    below = np.nextafter(np.float32(0.5), np.float32(0))
    g_t, g_p = np.array([[0.1, below, 0.9]], np.float32), np.array([[0.1, 0.5, 0.9]], np.float32)
    valid = np.ones_like(g_t, bool)

    def recorders():
        t = FakeRecorder([np.array([2, 1])] * 5, {0: (g_t, valid)}, valid, edges)
        t.acc_sums = [np.array([0.5, 0.25])] * 5
        p = FakeRecorder([np.array([1, 2])] + [np.array([2, 1])] * 4, {0: (g_p, valid)}, valid, edges)
        return t, p

    t, p = recorders()
    live = BinFlips({"ghmc": (t, p)}).explanation(1)
    # Recorded as the backward stage's cache keeps it (one step's calls), then read back.
    t, p = recorders()
    cache = ReferenceCache(tmp_path)
    cache.save("ghm", "k", recorded_calls(t, 0))
    replayed = RecordedGHM()
    replayed.add(dict(cache.load("ghm", "k")))
    assert [c.tolist() for c in replayed.counts] == [c.tolist() for c in t.counts]
    assert BinFlips({"ghmc": (replayed, p)}).explanation(1) == live
    assert "(mmdet, bin 0)" in live.detail
