"""The backward stage end to end on a small batch (2x3x96x128).

* In float64 (the stage's checked precision) three training steps of mmdet's
  model with mmengine's optimizer wrapper and schedulers and of ours agree
  within the targets: losses, gradient norms, learning rates, every step-1
  gradient, every parameter, momentum buffer and GHM ``acc_sum`` after the
  last step. The run uses a two-step warm-up, so the learning rate changes
  between steps, and a clipping threshold below the gradient norms, so the
  clipping acts: the configuration's max_norm of 35 is not reached here.
* The learning rate of every iteration of the whole 12-epoch schedule (50
  iterations per epoch here) equals mmengine's to 1e-12, and a difference of
  1e-13 at one iteration fails that comparison.
* A deliberate error in our optimizer (weight decay switched off, or the
  gradients not clipped) makes the stage fail, in the rows that error reaches.

The informational float32 run is left out, and the batch is small, to keep
the file short: each run builds both models, which costs more than a step.
"""
from __future__ import annotations

import json

from align.backward.records import BackwardOptions
from align.backward.stage import run_backward
from align.ghm.schedule import schedule_comparison
from paddle_impl.engine import optimizer
import pytest

# Whole stages, processes or the full-size model: `make test-fast` skips these.
pytestmark = pytest.mark.slow

SHAPE = "2x3x96x128"
CLIP = 5.0


def options(tmp_path, **overrides) -> BackwardOptions:
    # Without reprod_log files: in float64 they take about 1.8 GB per run.
    overrides.setdefault("schedule_iters_per_epoch", 0)
    return BackwardOptions(shape=SHAPE, dtype="float64", extra_dtype=None, reprod_log=False,
                           reports=tmp_path, **overrides)


def per_step(result) -> list:
    return next(t.rows for t in result.extra_tables if t.title.startswith("Per step"))


def failed_kinds(result) -> set[str]:
    """Kinds of the failed rows: 'grad', 'param', 'momentum', 'ghm' or 'stepN'."""
    return {t.name.split(".")[0] for t in result.tensors if not t.passed}


def test_float64_training_steps_meet_targets(tmp_path):
    result = run_backward(options(tmp_path, steps=3, warmup_iters=2, clip_max_norm=CLIP,
                                  schedule_iters_per_epoch=50))
    failures = [(t.name, t.reason) for t in result.tensors if not t.passed]
    assert result.passed, failures[:10]
    kinds = {t.name.split(".")[0] for t in result.tensors}
    assert {"grad", "param", "momentum", "ghm", "step1", "step3"} <= kinds
    assert any(t.name.startswith("grad.backbone.layer4") for t in result.tensors)

    steps = per_step(result)
    lrs = [row.lr for row in steps]
    assert lrs[1] > lrs[0], "the warm-up should raise the learning rate"
    assert all(row.clipped for row in steps), "the gradient norm should exceed max_norm at every step"
    # The differences are tiny next to how far the weights move.
    worst_param = max(t.max_abs for t in result.tensors if t.name.startswith("param."))
    assert result.meta["largest_parameter_change_mmdet"] > 1e4 * worst_param
    assert (tmp_path / "backward.json").is_file() and (tmp_path / "backward.html").is_file()

    schedule = result.meta["lr_schedule"]
    assert schedule["iterations"] == 12 * 50 and schedule["max_abs_diff"] <= 1e-14
    assert any(t.name == "lr_schedule.12_epochs_x_50_iters" and t.passed for t in result.tensors)
    boundaries = next(rows for title, _, rows in result.extra_tables if title.startswith("Learning rate over"))
    assert [row.iteration for row in boundaries] == [0, 499, 500, 399, 400, 549, 550, 599]


def test_schedule_difference_fails(monkeypatch):
    from align.ghm import schedule

    original = schedule.paddle_lrs

    def nudged(*args, **kwargs):
        lrs = original(*args, **kwargs)
        lrs[450] += 1e-13
        return lrs

    monkeypatch.setattr(schedule, "paddle_lrs", nudged)
    row, _, meta = schedule_comparison(50)
    assert not row.passed and row.name == "lr_schedule.12_epochs_x_50_iters"
    assert meta["first_iteration_not_bitwise_equal"] == 450 and meta["iterations_not_bitwise_equal"] == 1


def test_missing_weight_decay_fails(tmp_path, monkeypatch):
    original = optimizer.SGD.__init__

    def without_decay(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.weight_decay = 0.0

    monkeypatch.setattr(optimizer.SGD, "__init__", without_decay)
    result = run_backward(options(tmp_path, steps=1))
    assert not result.passed
    # Losses and gradients are computed before the first update; with the
    # warm-up's small learning rate the decay term shows in the momentum.
    assert failed_kinds(result) == {"momentum"}


def test_missing_clipping_fails(tmp_path, monkeypatch):
    def step_without_clipping(self, max_norm=None, norm_type=2.0):
        norm = optimizer.clip_grad_norm_(self._params.values(), float("inf"), norm_type)
        self.step()
        return norm

    monkeypatch.setattr(optimizer.SGD, "clip_and_step", step_without_clipping)
    result = run_backward(options(tmp_path, steps=1, clip_max_norm=CLIP))
    assert not result.passed
    assert "momentum" in failed_kinds(result)
    assert not {"grad", "step1"} & failed_kinds(result)


def test_isolated_layers_pass_in_float32_and_name_a_wrong_backward(tmp_path, monkeypatch):
    result = run_backward(options(tmp_path, steps=1, isolate=True))
    assert result.passed, [(r.name, r.reason) for r in result.layers if not r.passed][:5]
    names = {r.name for r in result.layers}
    # The shared head is compared per call (one per level), gradients of inputs and parameters.
    assert {"bbox_head.cls_convs.0.conv#4.weight.grad", "bbox_head.retina_cls#2.input_grad",
            "backbone.layer4.2.relu#2.input_grad"} <= names
    per_kind = result.meta["isolated_worst_per_kind"]
    assert {"conv", "BN", "ReLU", "pool"} <= set(per_kind) and all(v["rel"] <= 1e-5 for v in per_kind.values())

    # A layer whose backward is wrong (ReLU's input gradient 1e-3 too large) is the one named.
    import paddle

    from tests.align.faults import wrong_backward_relu

    monkeypatch.setattr(paddle.nn.ReLU, "forward", lambda self, x: wrong_backward_relu(x))
    broken = run_backward(options(tmp_path, steps=1, isolate=True))
    failed = {r.name for r in broken.layers if not r.passed}
    kinds = {row.call: row.kind for row in next(t.rows for t in broken.extra_tables
                                                if t.title.startswith("Isolated backward"))}
    assert failed and all(name.endswith(".input_grad") and kinds[name] == "ReLU" for name in failed)
    assert any(".activate" in name for name in failed) and any(".relu" in name for name in failed)


def test_float32_disagreements_are_explained_and_a_planted_one_is_not(tmp_path, monkeypatch):
    import dataclasses

    from paddle_impl.model import ghm_loss

    opts = dataclasses.replace(options(tmp_path, steps=3), extra_dtype="float32")
    result = run_backward(opts)
    assert result.passed
    assert result.meta["runs"]["float32"]["divergences"]["unexplained"] == 0

    # A loss weight wrong on one level (P3 of GHM-C, by 1%): no rounding explains it.
    original, calls = ghm_loss.GHMC.forward, {"n": 0}

    def heavier_first_level(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * 1.01 if calls["n"] % 5 == 1 else loss

    monkeypatch.setattr(ghm_loss.GHMC, "forward", heavier_first_level)
    planted = run_backward(dataclasses.replace(opts, steps=1))
    assert not planted.passed
    table = next(t.rows for t in planted.extra_tables if t.title.startswith("First disagreement per step and its "
                                                                           "cause, float32"))
    assert (table[0].step, table[0].row, table[0].verdict) == (1, "step1.loss_cls.P3", "unexplained")
    assert planted.meta["runs"]["float32"]["divergences"]["unexplained"] == 1


def comparable(result) -> tuple:
    """What a run reports, without its timings: every row and every table row."""
    rows = [(t.name, t.max_abs, t.mean_abs, t.rel_max, t.passed, t.reason) for t in result.tensors]
    tables = [(t.title, [tuple(row) for row in t.rows]) for t in result.extra_tables]
    return result.passed, rows, tables


def test_second_run_replays_mmdet_from_the_cache_and_still_catches_a_paddle_fault(tmp_path_factory, monkeypatch):
    import dataclasses

    from align.ghm import backward_reference as reference

    build = tmp_path_factory.mktemp("backward_cache")
    # float32: the recording then also holds every GHM call's per-element g, for the bin-flip explanation.
    opts = dataclasses.replace(options(tmp_path_factory.mktemp("r0"), steps=2, clip_max_norm=CLIP,
                                       schedule_iters_per_epoch=50), dtype="float32", build_dir=build)
    off = run_backward(opts)
    assert off.meta["runs"]["float32"]["reference_cache"] == "off" and not (build / "cache").exists()
    first = run_backward(dataclasses.replace(opts, reports=tmp_path_factory.mktemp("r1"), cache=True))
    assert first.meta["runs"]["float32"]["reference_cache"] == "miss"
    (entry,) = (build / "cache").glob("backward-float32-*")
    names = {item["name"] for item in json.loads((entry / "manifest.json").read_text())["arrays"]}
    assert len(list((build / "cache").glob("lr-schedule-*"))) == 1
    assert {"step0002/grad/bbox_head.retina_cls.weight", "step0002/state/momentum/neck.fpn_convs.0.conv.weight",
            "step0001/extra/relu/backbone.relu", "step0001/extra/ghm/ghmc/00000/g"} <= names

    # mmdet's model is not built when its side is replayed, and the report is the same, row for row.
    monkeypatch.setattr(reference, "build_torch_model", lambda *a, **k: pytest.fail("mmdet's model was built"))
    monkeypatch.setattr(reference, "mmengine_lrs", lambda *a, **k: pytest.fail("mmengine's schedule was run"))
    second = run_backward(dataclasses.replace(opts, reports=tmp_path_factory.mktemp("r2"), cache=True))
    assert second.meta["runs"]["float32"]["reference_cache"] == "hit"
    assert comparable(second) == comparable(first) == comparable(off)

    # A fault in our optimizer is caught against the replayed reference as against the live one.
    original = optimizer.SGD.__init__

    def without_decay(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.weight_decay = 0.0

    monkeypatch.setattr(optimizer.SGD, "__init__", without_decay)
    broken = run_backward(dataclasses.replace(opts, reports=tmp_path_factory.mktemp("r3"), cache=True))
    assert broken.meta["runs"]["float32"]["reference_cache"] == "hit"
    assert not broken.passed and "momentum" in failed_kinds(broken)
    monkeypatch.undo()

    # A damaged file is not trusted: the entry is recomputed.
    damaged = sorted(entry.glob("*.npy"))[len(names) // 2]
    damaged.write_bytes(damaged.read_bytes()[:-8])
    third = run_backward(dataclasses.replace(opts, reports=tmp_path_factory.mktemp("r4"), cache=True))
    assert third.meta["runs"]["float32"]["reference_cache"] == "mismatch"
    assert comparable(third) == comparable(off)
    fresh = run_backward(dataclasses.replace(opts, reports=tmp_path_factory.mktemp("r5"), cache=True, fresh=True))
    assert fresh.meta["runs"]["float32"]["reference_cache"] == "fresh"
    # Another clipping bound is another reference: a miss, not the entry above.
    other = run_backward(dataclasses.replace(opts, reports=tmp_path_factory.mktemp("r6"), cache=True,
                                             clip_max_norm=2 * CLIP, steps=1))
    assert other.meta["runs"]["float32"]["reference_cache"] == "miss"
    # It replaced the entry above: one recording per run kind stays on disk.
    assert [p.name for p in (build / "cache").glob("backward-float32-*")] != [entry.name]
    assert len(list((build / "cache").glob("backward-float32-*"))) == 1


def test_the_cache_key_covers_every_batch_including_one_without_boxes():
    import dataclasses

    from align.ghm.backward import make_batches
    from align.ghm.backward_reference import batches_digest

    opts = options(None, steps=4)
    batches = make_batches(opts)
    assert batches[3].truth.gt_bboxes[-1].shape == (0, 4)
    digest = batches_digest(batches)
    assert digest == batches_digest(make_batches(opts))
    assert digest != batches_digest(make_batches(dataclasses.replace(opts, seed=1)))
    moved = make_batches(opts)
    moved[2].truth.gt_bboxes[0][0, 0] += 1
    assert digest != batches_digest(moved)
