"""Backward and training-step alignment of the GHM RetinaNet.

From the same converted weights, mmdet's model (with mmengine's optimizer
wrapper and schedulers built from mmdet's config) and ours (``SGD``,
``clip_grad_norm_``, ``WarmupMultiStepLR``) train the same number of steps on
the same seeded batches. Compared at every step: each loss term, the total
loss, the gradient norm before clipping and the learning rate; at step 1 the
gradient of every parameter; after the last step every parameter, every
momentum buffer and the GHM losses' ``acc_sum``. For every step the report
also shows the worst gradient, parameter and momentum difference, so the
growth of the differences is visible, and how many ReLU elements switched
on in one framework and off in the other.

The warm-up is shortened to half the steps (by default 5 of 10), so the
schedule is exercised within a short run. The base learning rate is by
default the configuration's, scaled linearly to the batch as mmdet's
``auto_scale_lr`` does (0.01 for 16 images, so 0.00125 for 2). With rates
several times larger, the dynamics of these first steps on the synthetic
weights amplify any difference, however small at step 1, step after step
(at 16 times this rate the loss jumps by an order of magnitude within ten
steps): the per-step table shows that growth, and ``lr`` can be raised to
see it.

Precision. In float32 the two frameworks' forward passes differ by rounding,
and a pre-activation closer to zero than that difference can have opposite
signs on the two sides: the ReLU then passes the element's gradient in one
framework and blocks it in the other. A single such element changes a
convolution's weight gradient by a visible fraction of its largest entry, far
above what the semantics allow, although nothing is wrong. So the checked run
(``dtype``) is float64 by default: mmdet's model through ``module.double()``,
ours through ``Layer.to(dtype='float64')``, the images widened from the same
float32 values. Anchors and targets stay float32 on both sides, as in mmdet.
What mmdet itself still rounds to float32 in that run (GHM-C casts its
targets to float32, and torch's BCE-with-logits then computes the loss, and
so the gradient factor flowing into it, in the target's dtype) bounds the
agreement from below. A second, informational run (``extra_dtype``, float32
by default) measures the same figures at training precision; it does not
decide the verdict.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import numpy as np

from align.backward.records import DEFAULT_SHAPE, BackwardOptions, PairRun, StepRow
from align.backward.reference import Reference, mmdet_reference, mmengine_schedule
from align.backward.tables import ParameterRow, headline, loss_curve_png, relu_table, side_run, summarize
from align.engine.capture import ReluMaskCensus
from align.engine.cli import progress
from align.engine.compare import TensorDiff, compare_named, first_failed_name, to_numpy, worst_named, worst_of
from align.engine.reprod import reprod_log_diff
from align.engine.divergence import Explanation, StepEvidence, classify, explained
from align.engine.isolate import (TorchCallRecorder, isolated_backward, isolated_forward, isolation_tables,
                                  peak_memory_gb, spill_store, worst_per_kind)
from align.engine.paired import PairedStep, train_in_lockstep
from align.engine.report import StageResult
from align.engine.weights import NameMap
from align.ghm.divergence import BinFlips, relu_flips, row_kind
from align.ghm.fake_batch import random_batch
from align.ghm.pair import (MODEL_DTYPES, Checkpoints, build_paddle_model, build_torch_model, parse_shape,
                            prepare_checkpoints, seeded_images)
from align.ghm.recorders import PaddleGHMRecorder
from align.ghm.schedule import LR_TOL, schedule_comparison
from align.ghm.sides import FakeInputs, PaddleSide, data_samples
from align.ghm.suite import write_report

def make_batches(opts: BackwardOptions) -> list[FakeInputs]:
    """One batch of ``(N, 3, H, W)`` float32 images and ground truth per step, seeded."""
    shape = parse_shape(opts.shape)
    return [FakeInputs(seeded_images(shape, opts.seed + 1000 * (k + 1)),
                       random_batch(shape[2:], opts.seed + k, num_images=shape[0], empty_image=(k % 4 == 3)))
            for k in range(opts.steps)]


def train_pair(opts: BackwardOptions, dtype: str, ckpts: Checkpoints, batches: list[FakeInputs],
               warmup: int, keep_logs: bool) -> PairRun:
    """Train mmdet's model and ours in ``dtype`` in lockstep, comparing as they go (mmdet's side
    replayed from the cache when ``opts.cache`` finds it there, see `align.backward.reference`)."""
    settings = dict(lr=opts.lr, warmup=warmup, iters_per_epoch=opts.steps, max_norm=opts.clip_max_norm)
    paddle = PaddleSide.from_config(build_paddle_model(ckpts, dtype), **settings)
    # Per-element g of the GHM calls only where a divergence is expected to need them.
    keep_g = dtype == "float32"
    with mmdet_reference(ckpts, dtype, batches, settings, keep_g=keep_g, cache_dir=opts.build_dir / "cache",
                         use_cache=opts.cache, fresh=opts.fresh) as reference:
        run, figures, steps, causes, logs = _lockstep(opts, dtype, reference, paddle, batches, keep_g, keep_logs)
        final = reference.side.parameters()
    evidence = [StepEvidence(r.step, [row.name for row in r.rows if not row.passed], causes.get(r.step, []))
                for r in run.steps]
    initial = build_initial_params(ckpts)
    changes = [(float(np.abs(to_numpy(final[n]).astype(np.float64) - v).max()), float(np.abs(v).max()))
               for n, v in initial.items() if n in final]
    # Relative to each tensor's largest initial magnitude: how far the run
    # moved the weights on the scale the parameter rows are compared on.
    relative = [change / scale for change, scale in changes if scale > 0]
    return PairRun(dtype=dtype, rows=run.rows, steps=steps, relu_layers=figures["relu_layers"],
                   largest_change=max((c for c, _ in changes), default=0.0),
                   relative_change=(float(np.median(relative)), max(relative)) if relative else (0.0, 0.0),
                   seconds={"mmdet_s": run.seconds["mmdet"], "paddle_s": run.seconds["paddle"]}, logs=logs,
                   divergences=classify(evidence, row_kind), reference_cache=reference.status,
                   reference_check_s=reference.check_s)


def _lockstep(opts: BackwardOptions, dtype: str, reference: Reference, paddle: PaddleSide,
              batches: list[FakeInputs], keep_g: bool, keep_logs: bool):
    """The paired steps of `train_pair` with their comparisons; returns the `LockstepRun`, the
    figures, the per-step rows, the causes found per step and the reprod_log dicts."""
    mmdet = reference.side
    census = reference.census = ReluMaskCensus(reference.torch_model, paddle.model)
    p_head = paddle.model.bbox_head
    recorders = {"ghmc": (reference.ghm["ghmc"], PaddleGHMRecorder(p_head.loss_cls, keep_g)),
                 "ghmr": (reference.ghm["ghmr"], PaddleGHMRecorder(p_head.loss_bbox, keep_g))}
    bin_flips = BinFlips(recorders)
    causes: dict[int, list[Explanation]] = {}
    logs = ({}, {}) if keep_logs else None
    grad_logs: tuple[dict, dict] | None = ({}, {}) if keep_logs else None
    figures: dict[str, Any] = {"relu_layers": {}, "worst_grad": {}}
    steps: list[StepRow] = []
    last = len(batches)

    def tolerance(step: int, name: str) -> tuple[float, float]:
        tol = LR_TOL if name == "lr" else (opts.loss_tol_first if step == 1 else opts.loss_tol)
        return tol, tol

    def at_gradients(step: int) -> list[TensorDiff]:
        # Every step's worst gradient difference is reported; step 1's are also checked one by one.
        if step > 1:
            figures["worst_grad"][step] = worst_named("grad", mmdet.gradients(), paddle.gradients())
            return []
        rows = compare_named("grad", mmdet.gradients(), paddle.gradients(), opts.grad_tol, grad_logs)
        figures["worst_grad"][step] = worst_of(rows)
        return rows

    def after_step(record: PairedStep) -> list[TensorDiff]:
        step = record.step
        flips = census.finish_step()
        causes[step] = [c for c in (relu_flips(census.step_layers), bin_flips.explanation(step)) if c is not None]
        if step == 1:
            figures["relu_layers"] = {name: list(row) for name, row in census.layers.items()}
        if logs is not None:
            _log_step(logs, grad_logs if step == 1 else None, record)
        rows: list[TensorDiff] = []
        ref_state, test_state = mmdet.state(), paddle.state()
        if step == last:
            param_rows = compare_named("param", mmdet.parameters(), paddle.parameters(), opts.param_tol, logs)
            momentum_rows = compare_named("momentum", ref_state["momentum"], test_state["momentum"],
                                          opts.param_tol, logs)
            rows = param_rows + momentum_rows + compare_named("ghm", ref_state["ghm"], test_state["ghm"],
                                                              opts.param_tol, logs)
            worst_param, worst_momentum = worst_of(param_rows), worst_of(momentum_rows)
        else:
            worst_param = worst_named("param", mmdet.parameters(), paddle.parameters())
            worst_momentum = worst_named("momentum", ref_state["momentum"], test_state["momentum"])
        by_name = {row.name: row for row in record.rows}
        total, norm = f"step{step}.loss.total", by_name[f"step{step}.grad_norm"]
        worst_grad = figures["worst_grad"][step]
        steps.append(StepRow(
            step=step, lr=record.reference.lr, loss_mmdet=float(record.reference.losses["loss.total"]),
            loss_paddle=float(record.test.losses["loss.total"]), loss_rel=by_name[total].rel_max,
            grad_norm_mmdet=record.reference.grad_norm, grad_norm_paddle=record.test.grad_norm,
            grad_norm_rel=norm.rel_max, clipped=record.reference.grad_norm > reference.max_norm,
            worst_grad_rel=worst_grad[0], worst_grad=worst_grad[1][len("grad."):],
            worst_param_rel=worst_param[0], worst_param=worst_param[1][len("param."):],
            worst_momentum_rel=worst_momentum[0],
            # GHM's region counts jump when an element crosses a region edge:
            # with ReLU masks, the discontinuities that make differences grow.
            ghm_acc_sum_rel=worst_named("ghm", ref_state["ghm"], test_state["ghm"])[0], relu_flips=flips))
        return rows

    try:
        with contextlib.ExitStack() as stack:
            for _, recorder in recorders.values():
                stack.enter_context(recorder)
            run = train_in_lockstep(
                mmdet, paddle, [(b, b) for b in batches], label=lambda step: f"step{step}", tolerance=tolerance,
                at_gradients=at_gradients, before_step=reference.begin_step, after_step=after_step,
                progress=lambda items: progress(items, f"backward {dtype}", total=len(batches)))
    finally:
        census.remove()
    return run, figures, steps, causes, logs


def _log_step(logs: tuple[dict, dict], grad_logs: tuple[dict, dict] | None, record: PairedStep) -> None:
    """A step's compared values into the reprod_log dicts, in row order."""
    prefix = f"step{record.step}."
    for name, value in record.reference.losses.items():
        logs[0][prefix + name] = np.float64(value)
        logs[1][prefix + name] = np.float64(record.test.losses[name])
    if grad_logs is not None:
        logs[0].update(grad_logs[0])
        logs[1].update(grad_logs[1])
    for name in ("grad_norm", "lr"):
        logs[0][prefix + name] = np.float64(getattr(record.reference, name))
        logs[1][prefix + name] = np.float64(getattr(record.test, name))


def build_initial_params(ckpts) -> dict[str, np.ndarray]:
    from torch_ref.reference import load_mmdet_state_dict

    return {k: v.numpy().astype(np.float64) for k, v in load_mmdet_state_dict(ckpts.torch_path).items()}


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


def run_backward(opts: BackwardOptions) -> StageResult:
    """Train both in ``opts.dtype`` (and ``opts.extra_dtype``), diff, write ``backward*`` files."""
    from paddle_impl.engine.optimizer import scaled_lr

    opts = dataclasses.replace(opts, shape=opts.shape or DEFAULT_SHAPE)
    for dtype in (opts.dtype, opts.extra_dtype):
        if dtype is not None and dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {dtype!r}")
    if opts.lr is None:
        opts = dataclasses.replace(opts, lr=scaled_lr(parse_shape(opts.shape)[0]))
    warmup = opts.warmup_iters if opts.warmup_iters is not None else max(1, opts.steps // 2)
    if opts.paddle_threads is not None:
        import paddle

        paddle.base.core.set_num_threads(opts.paddle_threads)
    ckpts = prepare_checkpoints(opts.ckpt, opts.seed, opts.build_dir)
    batches = make_batches(opts)
    runs = [train_pair(opts, opts.dtype, ckpts, batches, warmup, keep_logs=opts.reprod_log)]
    if opts.extra_dtype not in (None, opts.dtype):
        runs.append(train_pair(opts, opts.extra_dtype, ckpts, batches, warmup, keep_logs=False))
    main = runs[0]
    schedule = (schedule_comparison(opts.schedule_iters_per_epoch,
                                    mmengine_schedule(cache_dir=opts.build_dir / "cache", use_cache=opts.cache,
                                                      fresh=opts.fresh))
                if opts.schedule_iters_per_epoch > 0 else None)

    reprod = (reprod_log_diff(main.logs[1], main.logs[0], opts.reports, "backward", opts.loss_tol)
              if opts.reprod_log else {})
    rows = main.rows + ([schedule[0]] if schedule else [])
    isolated, isolated_tables, isolated_meta = (run_isolated(opts, ckpts, batches[0]) if opts.isolate
                                                else ([], [], {}))
    # A run whose first disagreement in some step has no rounding-level cause fails, whatever its precision.
    passed = (all(r.passed for r in rows) and all(r.passed for r in isolated)
              and all(explained(run.divergences) for run in runs))
    summaries = [row for run in runs for row in summarize(run, opts)]
    ranked = sorted((r for r in main.rows if r.name.startswith("param.")),
                    key=lambda r: -(math.inf if math.isnan(r.rel_max) else r.rel_max))
    step_columns = ["step", "lr", "loss mmdet", "loss paddle", "loss rel", "grad norm mmdet",
                    "grad norm paddle", "grad norm rel", "clipped",
                    "worst grad rel", "worst grad", "worst param rel (after step)", "worst param",
                    "worst momentum rel (after step)", "GHM acc_sum rel (after step)", "ReLU mask flips"]
    tables = [("Worst difference per category (the first run decides the verdict)",
               ["run", "category", "compared", "worst rel", "worst tensor", "tolerance", "all within"],
               summaries)]
    for run in runs:
        role = "checked" if run is main else "informational"
        tables.append((f"Per step, {run.dtype} ({role})", step_columns, run.steps))
    relu_columns = ["ReLU layer"]
    for run in runs:
        relu_columns += [f"flips {run.dtype}", f"largest |pre-activation| at a flip, {run.dtype}"]
    tables.append(("ReLU mask disagreements at step 1 (elements on in one framework, off in the other)",
                   relu_columns + ["elements"], relu_table(runs)))
    if schedule:
        tables.append((f"Learning rate over the whole schedule, mmengine vs ours "
                       f"({schedule[2]['iters_per_epoch']} iterations per epoch; every iteration compared, "
                       f"{schedule[2]['iterations_not_bitwise_equal']} not bit-for-bit equal)",
                       ["boundary", "iteration", "epoch", "mmengine lr", "paddle lr", "abs diff"], schedule[1]))
    for run in runs:
        if run.divergences:
            tables.append((f"First disagreement per step and its cause, {run.dtype} (unexplained fails the stage)",
                           ["step", "first disagreeing row", "verdict", "cause", "elements", "detail"],
                           run.divergences))
    tables.append((f"Parameters ranked by difference after the last step ({main.dtype})",
                   ["parameter", "max abs diff", "rel", "pass"],
                   [ParameterRow(r.name[len("param."):], r.max_abs, r.rel_max, r.passed) for r in ranked[:40]]))

    meta = {
        "seed": opts.seed,
        "input_shape": list(parse_shape(opts.shape)),
        "steps": opts.steps,
        "base_lr": opts.lr,
        "warmup_iters": warmup,
        "clip_max_norm": opts.clip_max_norm,
        "paddle_threads": opts.paddle_threads,
        "dtype": main.dtype,
        "extra_dtype": runs[1].dtype if len(runs) > 1 else None,
        "largest_parameter_change_mmdet": main.largest_change,
        "parameter_change_relative_mmdet": dict(zip(("median", "max"), main.relative_change)),
        "lr_schedule": schedule[2] if schedule else None,
        "checkpoint": str(ckpts.torch_path),
        "checkpoint_sha256": ckpts.sha256,
        "checkpoint_synthetic": ckpts.synthetic,
        **{k: round(v, 3) for k, v in main.seconds.items()},
        **isolated_meta,
        "runs": {run.dtype: {
            "largest_parameter_change_mmdet": run.largest_change,
            "parameter_change_relative_mmdet": dict(zip(("median", "max"), run.relative_change)),
            "relu_mask_flips_step1": sum(r[0] for r in run.relu_layers.values()),
            # "hit": mmdet's side was replayed from build/cache (its time is then only the replay's).
            "reference_cache": run.reference_cache,
            "reference_cache_check_s": round(run.reference_check_s, 3),
            "divergences": {"steps": len(run.divergences),
                            "unexplained": sum(d.verdict == "unexplained" for d in run.divergences),
                            "causes": sorted({d.cause for d in run.divergences})},
            **{k: round(v, 3) for k, v in run.seconds.items()},
            "worst": {row.category: {"rel": row.worst_rel, "tensor": row.worst_tensor, "within": row.within}
                      for row in summaries if row.run == run.dtype},
        } for run in runs},
    }
    return write_report(StageResult(
        stage="backward",
        title="Backward: training steps, mmdet vs Paddle",
        passed=passed,
        tensors=rows,
        layers=isolated,
        thresholds={"precision of the checked run": main.dtype,
                    "step-1 gradients (rel)": opts.grad_tol,
                    "step-1 losses, grad norm (rel)": opts.loss_tol_first,
                    "later losses, grad norms (rel)": opts.loss_tol,
                    "parameters, momentum, GHM acc_sum after the last step (rel)": opts.param_tol,
                    "lr, per step and over the whole schedule (rel)": LR_TOL,
                    **({"isolated layers at step 1, float32 (rel)": opts.isolate_tol} if opts.isolate else {})},
        meta=meta,
        extra_tables=tables + isolated_tables,
        figures=[("Total loss per step and relative difference", loss_curve_png(runs, opts.loss_tol_first,
                                                                                opts.loss_tol))],
        reprod_log=reprod,
        reprod_log_check=opts.loss_tol,
        reprod_log_why=("each row is bounded relative to the largest value of its own tensor, by category "
                        "(see thresholds), where reprod_log applies one absolute mean to every tensor"),
        headline=headline(summaries, main.dtype, opts.grad_tol),
        seconds={"mmdet": main.seconds["mmdet_s"], "paddle": main.seconds["paddle_s"]},
        side_run=side_run(runs[1], summaries) if len(runs) > 1 else "",
    ), opts.reports)


def first_divergence(result: StageResult) -> str | None:
    """The first failed row of the training runs, else of the isolated layers."""
    return first_failed_name(result.tensors, result.layers)
