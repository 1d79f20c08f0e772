"""The engine's paired training loop on two toy sides (no framework needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from align.engine.compare import compare_named
from align.engine.paired import StepValues, train_in_lockstep, value_series


class ToySide:
    """Gradient descent on ``w`` for the loss ``sum((w - target)**2) * scale``."""

    def __init__(self, name: str, scale: float = 1.0, drop_term: bool = False, skip_hook: bool = False):
        self.name, self.scale, self.drop_term, self.skip_hook = name, scale, drop_term, skip_hook
        self.w = np.zeros(3)
        self.grad = None
        self.lr = 0.1
        self.log: list[str] = []

    def train_step(self, batch, after_backward=None) -> StepValues:
        self.log.append(f"{self.name} forward")
        residual = self.w - batch
        loss = float((residual ** 2).sum()) * self.scale
        self.grad = 2 * residual * self.scale
        if after_backward is not None and not self.skip_hook:
            after_backward()
        norm = float(np.linalg.norm(self.grad))
        self.w = self.w - self.lr * self.grad
        self.grad = None
        self.log.append(f"{self.name} update")
        losses = {"loss": loss} if self.drop_term else {"loss": loss, "loss.half": loss / 2}
        return StepValues(losses=losses, grad_norm=norm, lr=self.lr)

    def gradients(self):
        return {"w": self.grad}

    def parameters(self):
        return {"w": self.w}

    def state(self):
        return {}


BATCHES = [(np.array([1.0, 2.0, 3.0]),) * 2, (np.array([0.5, -1.0, 2.0]),) * 2]


def run(ref, test, **kwargs):
    return train_in_lockstep(ref, test, BATCHES, label=lambda step: f"step{step}",
                             tolerance=lambda step, name: (1e-6, 1e-6), **kwargs)


def test_identical_sides_pass_with_rows_in_execution_order():
    ref, test = ToySide("torch"), ToySide("paddle")
    seen = []

    def at_gradients(step):
        # Both sides hold their gradients of this step here.
        assert ref.grad is not None and test.grad is not None
        seen.append(step)
        return compare_named("grad", ref.gradients(), test.gradients(), 1e-6)

    result = run(ref, test, at_gradients=at_gradients,
                 after_step=lambda record: compare_named("param", ref.parameters(), test.parameters(), 1e-6))
    assert seen == [1, 2]
    assert [r.name for r in result.rows[:6]] == ["step1.loss", "step1.loss.half", "grad.w", "step1.grad_norm",
                                                 "step1.lr", "param.w"]
    assert all(r.passed for r in result.rows) and len(result.steps) == 2
    # The reference's forward runs first, and the test side's whole step inside the reference's.
    assert ref.log[:1] == ["torch forward"] and test.log == ["paddle forward", "paddle update"] * 2
    assert set(result.seconds) == {"torch", "paddle"} and all(v >= 0 for v in result.seconds.values())
    assert value_series(result, "test", ["loss", "lr"])["lr"] == [0.1, 0.1]


def test_a_different_side_fails_at_its_first_loss_row():
    result = run(ToySide("torch"), ToySide("paddle", scale=1.0 + 1e-3))
    first = next(r for r in result.rows if not r.passed)
    assert first.name == "step1.loss"


def test_a_missing_term_fails():
    result = run(ToySide("torch"), ToySide("paddle", drop_term=True))
    row = next(r for r in result.rows if r.name == "step1.loss.half")
    assert not row.passed and "NaN in paddle" in row.reason and math.isnan(row.max_abs)


def test_a_side_that_skips_the_hook_is_an_error():
    with pytest.raises(RuntimeError, match="did not call after_backward"):
        run(ToySide("torch", skip_hook=True), ToySide("paddle"))


class StatefulToySide(ToySide):
    """`ToySide` with a state group, as an optimizer's buffers."""

    def state(self):
        return {"momentum": {"w": self.w * 0.5}}


def test_a_recorded_side_replays_every_value_the_loop_reads(tmp_path):
    from align.engine.cache import ReferenceCache
    from align.engine.replay import RecordingSide, ReplaySide

    def paired(reference):
        """The loop with gradient and parameter rows, and the reference's gradients as seen."""
        test, seen = StatefulToySide("paddle", scale=1.001), []

        def at_gradients(step):
            seen.append(np.array(reference.gradients()["w"]))
            return compare_named("grad", reference.gradients(), test.gradients(), 1e-9)

        lockstep = run(reference, test, at_gradients=at_gradients,
                       after_step=lambda record: compare_named("param", reference.parameters(), test.parameters(),
                                                               1e-9))
        return lockstep, seen

    cache = ReferenceCache(tmp_path)
    live_ref = StatefulToySide("torch")
    with cache.writer("toy", "k") as entry:
        live, recorded = paired(RecordingSide(live_ref, entry, extras=lambda: {"hook": live_ref.grad * 3}))
    replay = ReplaySide("torch", cache.load("toy", "k"))
    assert replay.steps == 2
    with pytest.raises(ValueError, match="no parameters before step 1"):
        replay.parameters()
    replayed, seen = paired(replay)
    assert [(r.name, r.max_abs, r.passed) for r in replayed.rows] == [(r.name, r.max_abs, r.passed) for r in live.rows]
    assert {r.name.split(".")[0] for r in replayed.rows} >= {"grad", "param"}
    assert [s.reference for s in replayed.steps] == [s.reference for s in live.steps]
    np.testing.assert_array_equal(np.array(seen), np.array(recorded))
    np.testing.assert_array_equal(replay.parameters()["w"], live_ref.w)
    np.testing.assert_array_equal(replay.state()["momentum"]["w"], live_ref.w * 0.5)
    np.testing.assert_array_equal(replay.extras(2)["hook"], recorded[1] * 3)
    with pytest.raises(ValueError, match="has 2 steps; step 3"):
        replay.train_step(None)


def test_an_interrupted_recording_leaves_no_entry(tmp_path):
    from align.engine.cache import ReferenceCache

    cache = ReferenceCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.writer("toy", "k") as entry:
            entry.add("a", np.ones(3))
            with pytest.raises(ValueError, match="added twice"):
                entry.add("a", np.ones(3))
            raise RuntimeError("stopped")
    assert cache.load("toy", "k") is None and not cache.entry("toy", "k").exists()


def test_a_recording_that_cannot_be_written_names_the_file_and_leaves_no_entry(tmp_path, monkeypatch):
    from align.engine import cache as cache_module
    from common.atomic_write import WriteError

    cache = cache_module.ReferenceCache(tmp_path)
    old, new = cache_module.cache_key({"run": 1}), cache_module.cache_key({"run": 2})

    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with cache.writer("toy", old) as entry:
        entry.add("a", np.ones(3))
    monkeypatch.setattr(cache_module.np, "save", full_disk)
    with pytest.raises(WriteError, match=rf"toy-{new[:20]}/00000\.npy: cannot write \(No space left on device\)"):
        with cache.writer("toy", new) as entry:
            entry.add("a", np.ones(3))
    # The new entry is gone; the old one was replaced before the recording started.
    assert list(tmp_path.iterdir()) == []
