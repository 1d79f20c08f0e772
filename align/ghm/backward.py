"""The GHM RetinaNet as a pair of the backward stage (`align.backward.lockstep`).

From the same converted weights, mmdet's model (with mmengine's optimizer wrapper and
schedulers built from mmdet's config) and ours (``SGD``, ``clip_grad_norm_``,
``WarmupMultiStepLR``) train the same number of steps on the same seeded batches
(``(N, 3, H, W)`` images and ground truth, every fourth batch with an image without boxes).
Besides what the stage compares for every pair, this client adds:

- the GHM losses' ``acc_sum`` as a state group, compared after the last step;
- `GhmDiagnostics`: every GHM call's bin counts on both sides, and in float32 each element's
  g, so a GHM bin flip explains a step's first disagreement (`align.ghm.divergence.BinFlips`)
  beside the ReLU mask flips every pair has;
- mmdet's side kept in and replayed from the reference cache (`align.ghm.backward_reference`);
- the learning rate of every iteration of the whole 12-epoch schedule, mmengine's schedulers
  vs ours (`align.ghm.schedule`), and with ``isolate`` every leaf layer at step 1 on mmdet's
  recorded input and output gradient.

The warm-up is shortened to half the steps, so the schedule is exercised within a short
run; the base learning rate is the configuration's scaled linearly to the batch, as
mmdet's ``auto_scale_lr`` does (0.01 for 16 images, so 0.00125 for 2).

Precision. The checked run is float64 (mmdet's model through ``module.double()``, ours
through ``Layer.to(dtype='float64')``, the images widened from the same float32 values;
anchors and targets stay float32 on both sides, as in mmdet): in float32 a pre-activation
within rounding of zero flips a ReLU mask, which moves a convolution's weight gradient by
a visible fraction although nothing is wrong. The informational float32 run measures the
same figures at training precision, and an unexplained first disagreement in it fails the stage.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import numpy as np

from align.backward.lockstep import Bounds, Diagnostics, Extras, RunSides
from align.backward.records import DEFAULT_SHAPE, BackwardOptions
from align.engine.divergence import Explanation
from align.engine.isolate import (TorchCallRecorder, isolated_backward, isolated_forward, isolation_tables,
                                  peak_memory_gb, spill_store, worst_per_kind)
from align.engine.weights import NameMap
from align.ghm.backward_reference import mmdet_reference, mmengine_schedule
from align.ghm.divergence import BinFlips
from align.ghm.fake_batch import random_batch
from align.ghm.pair import (MODEL_DTYPES, Checkpoints, build_paddle_model, build_torch_model, parse_shape,
                            prepare_checkpoints, seeded_images)
from align.ghm.recorders import PaddleGHMRecorder, RecordedGHM, TorchGHMRecorder, recorded_calls
from align.ghm.schedule import LR_TOL, schedule_comparison
from align.ghm.sides import FakeInputs, PaddleSide, data_samples
from align.ghm.suite import write_report


def make_batches(opts: BackwardOptions) -> list[FakeInputs]:
    """One batch of ``(N, 3, H, W)`` float32 images and ground truth per step, seeded."""
    shape = parse_shape(opts.shape)
    return [FakeInputs(seeded_images(shape, opts.seed + 1000 * (k + 1)),
                       random_batch(shape[2:], opts.seed + k, num_images=shape[0], empty_image=(k % 4 == 3)))
            for k in range(opts.steps)]


class GhmDiagnostics(Diagnostics):
    """The ReLU census of every pair, and every GHM call's bin counts on both sides (with each
    element's g when ``keep_g``), so a GHM bin flip explains a step too."""

    def __init__(self, keep_g: bool):
        super().__init__()
        self.keep_g = keep_g
        self.recorders: dict[str, tuple[Any, Any]] = {}
        self._stack = contextlib.ExitStack()
        self._bin_flips: Optional[BinFlips] = None
        # Per GHM loss, how many of its calls are recorded so far.
        self._recorded_calls: dict[str, int] = {}

    def attach(self, sides: RunSides) -> None:
        super().attach(sides)
        head = sides.test_model.bbox_head
        if sides.reference_model is None:
            torch_side = {"ghmc": RecordedGHM(), "ghmr": RecordedGHM()}
        else:
            t_head = sides.reference_model.bbox_head
            torch_side = {"ghmc": self._stack.enter_context(TorchGHMRecorder(t_head.loss_cls, "cls", self.keep_g)),
                          "ghmr": self._stack.enter_context(TorchGHMRecorder(t_head.loss_bbox, "bbox", self.keep_g))}
        self.recorders = {
            "ghmc": (torch_side["ghmc"], self._stack.enter_context(PaddleGHMRecorder(head.loss_cls, self.keep_g))),
            "ghmr": (torch_side["ghmr"], self._stack.enter_context(PaddleGHMRecorder(head.loss_bbox, self.keep_g)))}
        self._bin_flips = BinFlips(self.recorders)

    def reference_extras(self) -> dict[str, np.ndarray]:
        out = super().reference_extras()
        for kind, (recorder, _) in self.recorders.items():
            first = self._recorded_calls.get(kind, 0)
            out.update({f"ghm/{kind}/{name}": a for name, a in recorded_calls(recorder, first).items()})
            self._recorded_calls[kind] = len(recorder.counts)
        return out

    def before_step(self, step: int, recorded: Optional[dict[str, np.ndarray]]) -> None:
        if recorded is not None:
            for kind, (replayed, _) in self.recorders.items():
                prefix = f"ghm/{kind}/"
                replayed.add({name[len(prefix):]: a for name, a in recorded.items() if name.startswith(prefix)})
        super().before_step(step, recorded)

    def after_step(self, step: int) -> tuple[list[Explanation], list[Any]]:
        causes, cells = super().after_step(step)
        flips = self._bin_flips.explanation(step)
        return causes + ([flips] if flips is not None else []), cells

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stack.close()


class GhmTraining:
    """mmdet's GHM RetinaNet and ours as the backward stage's `TrainingPair` (module docstring)."""

    stage = "backward"
    title = "Backward: training steps, mmdet vs Paddle"
    reference = "mmdet"
    total = "loss.total"
    state_labels = {"momentum": "momentum buffers", "ghm": "GHM acc_sum"}
    informational_decides = True
    write_report = staticmethod(write_report)

    def __init__(self, opts: BackwardOptions):
        from paddle_impl.engine.optimizer import scaled_lr

        opts = dataclasses.replace(opts, shape=opts.shape or DEFAULT_SHAPE)
        for dtype in (opts.dtype, opts.extra_dtype):
            if dtype is not None and dtype not in MODEL_DTYPES:
                raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {dtype!r}")
        if opts.lr is None:
            opts = dataclasses.replace(opts, lr=scaled_lr(parse_shape(opts.shape)[0]))
        self.opts, self.steps = opts, opts.steps
        self.dtypes = [opts.dtype] + ([opts.extra_dtype] if opts.extra_dtype not in (None, opts.dtype) else [])
        self.warmup = opts.warmup_iters if opts.warmup_iters is not None else max(1, opts.steps // 2)
        if opts.paddle_threads is not None:
            import paddle

            paddle.base.core.set_num_threads(opts.paddle_threads)
        self.ckpts: Checkpoints = prepare_checkpoints(opts.ckpt, opts.seed, opts.build_dir)
        self._batches = make_batches(opts)
        self.meta = {"seed": opts.seed, "input_shape": list(parse_shape(opts.shape)), "steps": opts.steps,
                     "base_lr": opts.lr, "warmup_iters": self.warmup, "clip_max_norm": opts.clip_max_norm,
                     "paddle_threads": opts.paddle_threads, "checkpoint": str(self.ckpts.torch_path),
                     "checkpoint_sha256": self.ckpts.sha256, "checkpoint_synthetic": self.ckpts.synthetic}

    def bounds(self, dtype: str) -> Bounds:
        o = self.opts
        return Bounds(grad=o.grad_tol, loss_first=o.loss_tol_first, loss=o.loss_tol, state=o.param_tol, lr=LR_TOL)

    def batches(self, dtype: str) -> list[tuple[FakeInputs, FakeInputs]]:
        return [(b, b) for b in self._batches]

    def diagnostics(self, dtype: str) -> GhmDiagnostics:
        # Per-element g of the GHM calls only where a divergence is expected to need them.
        return GhmDiagnostics(keep_g=dtype == "float32")

    @contextlib.contextmanager
    def sides(self, dtype: str, diagnostics: Diagnostics) -> Iterator[RunSides]:
        o = self.opts
        settings = dict(lr=o.lr, warmup=self.warmup, iters_per_epoch=o.steps, max_norm=o.clip_max_norm)
        paddle = PaddleSide.from_config(build_paddle_model(self.ckpts, dtype), **settings)
        with mmdet_reference(self.ckpts, dtype, self._batches, settings, keep_g=dtype == "float32",
                             cache_dir=o.build_dir / "cache", use_cache=o.cache, fresh=o.fresh,
                             extras=diagnostics.reference_extras) as ref:
            yield RunSides(ref.side, paddle, ref.torch_model, paddle.model, ref.max_norm, ref.status, ref.check_s)

    def finish(self, runs) -> Extras:
        """The whole schedule's learning rates and, with ``isolate``, the isolated layers."""
        o = self.opts
        extras = Extras(thresholds={"lr over the whole schedule (rel)": LR_TOL}, meta={"lr_schedule": None})
        if o.schedule_iters_per_epoch > 0:
            row, boundaries, meta = schedule_comparison(
                o.schedule_iters_per_epoch,
                mmengine_schedule(cache_dir=o.build_dir / "cache", use_cache=o.cache, fresh=o.fresh))
            extras.rows.append(row)
            extras.meta["lr_schedule"] = meta
            extras.tables.append((f"Learning rate over the whole schedule, mmengine vs ours "
                                  f"({meta['iters_per_epoch']} iterations per epoch; every iteration compared, "
                                  f"{meta['iterations_not_bitwise_equal']} not bit-for-bit equal)",
                                  ["boundary", "iteration", "epoch", "mmengine lr", "paddle lr", "abs diff"],
                                  boundaries))
        if o.isolate:
            extras.layers, extras.late_tables, meta = run_isolated(o, self.ckpts, self._batches[0])
            extras.meta.update(meta)
            extras.thresholds["isolated layers at step 1, float32 (rel)"] = o.isolate_tol
        return extras


def run_isolated(opts: BackwardOptions, ckpts: Checkpoints, batch: FakeInputs):
    """Step 1 in float32, each leaf layer alone: mmdet's model records every call's input, output
    and output gradient of the loss; each layer of ours (and mmdet's, for the reference
    gradients) then runs on them. Returns the rows, the report tables and figures for the meta."""
    import torch

    mmdet, ours = build_torch_model(ckpts), build_paddle_model(ckpts)
    mmdet.train()
    ours.train()
    tol = dict(rel_tol=opts.isolate_tol, mean_tol=opts.isolate_tol)
    with spill_store(True, opts.build_dir / "isolate") as store:
        recorder = TorchCallRecorder(mmdet, store, grads=True)
        with recorder:
            losses = mmdet.loss(torch.from_numpy(batch.images), data_samples(batch.truth))
            mmdet.parse_losses(losses)[0].backward()
        forward_rows = isolated_forward(recorder.calls, store, ours, NameMap(), **tol)
        backward_rows = isolated_backward(recorder.calls, store, mmdet, ours, NameMap(), **tol)
        recorded = store.nbytes
    kinds = {c.key: c.kind for c in recorder.calls}
    tables = isolation_tables(forward_rows, backward_rows, [], kinds)
    meta = {"isolated_rows": len(forward_rows) + len(backward_rows),
            "isolated_recorded_gb": round(recorded / 2 ** 30, 2), "isolated_peak_memory_gb": round(peak_memory_gb(), 2),
            "isolated_worst_per_kind": {row.kind: {"rel": row.worst_rel, "where": row.worst_call}
                                        for row in worst_per_kind(forward_rows + backward_rows, kinds)}}
    return forward_rows + backward_rows, tables, meta
