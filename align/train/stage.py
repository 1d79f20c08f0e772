"""Training alignment: K iterations on the tiny COCO, each framework with its own data pipeline.

From the same converted weights, both sides train ``iters`` iterations on the
tiny COCO's filtered training split, batches of 2 in dataset order (no
shuffle: epoch after epoch, images 0-1, 2-3, ...), with the same ``Resize``
scale (``--scale``, default 320x192 so that 20 iterations take a few minutes
on 2 cores; mmdet's config is overridden to it).

- mmdet: its own ``CocoDataset`` + train pipeline, ``pseudo_collate``, and
  ``model.train_step(data, optim_wrapper)``, which runs its
  ``DetDataPreprocessor``, ``loss``, ``parse_losses`` and the
  ``OptimWrapper`` (SGD, momentum 0.9, weight decay 1e-4, clip 35) built from
  the config with ``lr`` replaced; mmengine's ``LinearLR`` (stepped after
  each iteration, ``end`` = warm-up length) and ``MultiStepLR`` (stepped after
  each epoch) from the config's ``param_scheduler``.
- ours: ``CocoDetection`` + ``Collate``, the engine's ``train_step``
  and ``WarmupMultiStepLR`` with the same lr, warm-up and epoch length.

The default lr is 0.00125, the config's 0.01 for 16 images scaled to 2 by
the linear rule. With lr 0.01 on 2 images the loss jumps about (15 -> 6 ->
5 -> 7.5 -> 4.7 -> 8 -> 10 measured): training that unstable amplifies any
difference between the frameworks about tenfold per iteration, so it
compares rounding, not the code.

Precision. GHM's weights are a discontinuous function of the predictions: a
sample moving across a bin edge changes the weight of its whole bin. In
float32 the two frameworks' rounding differences (2e-7 relative in the loss,
growing with training) eventually put a gradient value that lies within that
rounding of an edge in different bins on the two sides; from then on the
losses differ by far more than the code does (measured at the defaults:
agreement to 2e-7 through iteration 7, then a GHM-R P3 bin count differs at
iteration 8 and the losses separate by up to 3e-2). So the checked run
(``dtype``) is float64 by default, as in the backward stage:

- mmdet's model through ``module.double()`` (``build_torch_model``), except
  its ``DetDataPreprocessor``, which is kept in float32 so that it normalizes
  exactly as in mmdet's float32 training; a forward hook on it widens the
  ``inputs`` it returns (``(N, 3, H, W)``) to float64. ``train_step`` is
  otherwise mmdet's own, unchanged.
- ours through ``Layer.to(dtype='float64')`` (``build_paddle_model``), the
  ``(N, 3, H, W)`` float32 image batch of ``Collate`` widened to float64
  before ``RetinaNet.loss``.

Both models thus see the same float32 values, widened. Anchors and targets
stay float32 on both sides, as in mmdet. A second, informational run
(``extra_dtype``, float32 by default) trains the pair again at training
precision; its per-iteration differences and its first GHM bin-count
difference are reported but do not decide the verdict.

Flips (``--flip``): ``seeded`` (default) draws each sample's flip from our
dataset's seeded rule ``(seed, epoch, index)`` and hands mmdet the same
decision by taking that sample from an mmdet dataset whose ``RandomFlip`` is
forced on (prob 1.0) or off (prob 0.0); ``on`` and ``off`` force it for every
sample on both sides. mmdet's own ``RandomFlip`` draws from numpy's global
generator, which cannot be made to agree with another pipeline.

Compared per iteration (checked run): the learning rate used, ``loss_cls``
and ``loss_bbox`` (each the sum over the 5 levels), their total and the
gradient norm before clipping (relative, default 1e-4; lr 1e-10).

Diagnosis, not part of the verdict: the GHM bin counts of every GHM-C and
GHM-R call (5 levels per iteration) are recorded on both sides, with the loss
stage's recorders, and the report lists, per run, the calls where they
differ; the first such call is where an otherwise rounding-level agreement
of the losses breaks.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from align.engine.capture import ReluMaskCensus
from align.engine.cli import progress
from align.engine.compare import TensorDiff, first_failed_name
from align.engine.reprod import reprod_log_diff
from align.engine.divergence import Divergence, StepEvidence, classify, describe, explained
from align.engine.paired import train_in_lockstep, value_series
from align.engine.report import Headline, StageResult
from align.ghm.divergence import BinFlips, relu_flips, row_kind
from align.engine.options import option, seed_option
from align.ghm.pair import (LEVELS, MODEL_DTYPES, Checkpoints, GhmStageOptions, build_paddle_model,
                            build_torch_model, dtype_option, extra_dtype_option, prepare_checkpoints)
from common.arguments import format_size, non_negative, non_negative_float, parse_size, positive, positive_float
from align.ghm.pipelines import mmdet_batch, mmdet_dataset, mmdet_setup, our_dataset, tiny_coco_root
from align.ghm.recorders import PaddleGHMRecorder, TorchGHMRecorder
from align.ghm.sides import MmdetSide, PaddleSide, summed_terms
from align.ghm.suite import write_report

# File stem of the report: ``train.html`` is the report of a real training run (``make train-full``).
STAGE = "train_align"
DEFAULT_SCALE = (320, 192)
BATCH_SIZE = 2
FLIP_MODES = ("seeded", "on", "off")
VALUE_NAMES = ("loss_cls", "loss_bbox", "loss", "grad_norm", "lr")
LR_TOL = 1e-10


class IterationRow(NamedTuple):
    """One iteration of a run, as the report's per-iteration table shows it."""

    iter: int
    epoch: int
    images: str
    flips: str
    lr: float
    mmdet_loss: float
    paddle_loss: float
    loss_rel_diff: float
    grad_norm_mmdet: float
    grad_norm_paddle: float
    grad_norm_rel_diff: float


ITERATION_COLUMNS = ["iter", "epoch", "images", "flips", "lr", "mmdet loss", "paddle loss", "loss rel diff",
                     "grad norm mmdet", "grad norm paddle", "grad norm rel diff"]
class BinRow(NamedTuple):
    """A GHM call whose bin counts differ between the sides."""

    iter: int
    loss: str  # "ghmc" or "ghmr"
    level: str
    bins: str
    mmdet_counts: str
    paddle_counts: str


BIN_COLUMNS = ["iter", "loss", "level", "bins that differ", "mmdet counts", "paddle counts"]


@dataclass
class TrainOptions(GhmStageOptions):
    """Settings of the train stage.

    ``dtype`` is the precision of the run whose figures decide the verdict;
    ``extra_dtype`` (None: none) a second run measured and reported beside it.
    """

    seed: int = seed_option("seed of the tiny COCO, the flips and the default weights (default %(default)s)")
    iters: int = option(20, "training iterations (default %(default)s)", type=positive)
    # The reference lr 0.01 for 16 images, scaled to this stage's 2 by the linear rule.
    lr: float = option(0.00125, "base learning rate of both sides (default %(default)s: 0.01 x 2/16 images)",
                       type=positive_float)
    warmup_iters: int | None = option(None, "linear warm-up length (default: iters // 2)", type=non_negative)
    scale: tuple[int, int] = option(DEFAULT_SCALE, f"train Resize bound WxH (mmdet's scale=(w, h)) for both "
                                                   f"pipelines (default {format_size(DEFAULT_SCALE)})", type=parse_size)
    flip: str = option("seeded", "seeded: the same seeded decision per sample on both sides; on/off: forced",
                       choices=FLIP_MODES)
    dtype: str = dtype_option()
    extra_dtype: str | None = extra_dtype_option()
    loss_rel_tol: float = option(1e-4, "relative bound on the losses and gradient norm per iteration "
                                       "(default %(default)s)", type=non_negative_float)


class BatchPlan:
    """Which samples each iteration takes, and whether each is flipped (same on both sides).

    Iteration ``it`` is batch ``b = it % iters_per_epoch`` of epoch
    ``e = it // iters_per_epoch``: dataset indices ``2b, 2b + 1`` (the last
    batch of an epoch may hold one image), keyed ``SampleKey(index, e, b)``.
    """

    def __init__(self, our_ds, flip: str):
        self.dataset = our_ds
        self.flip = flip
        self.size = len(our_ds)
        self.iters_per_epoch = math.ceil(self.size / BATCH_SIZE)

    def keys(self, it: int):
        from paddle_impl.data.samplers import SampleKey

        epoch, batch = divmod(it, self.iters_per_epoch)
        begin = batch * BATCH_SIZE
        return [SampleKey(i, epoch, batch) for i in range(begin, min(begin + BATCH_SIZE, self.size))]

    def flips(self, keys) -> list[bool]:
        if self.flip == "on":
            return [True] * len(keys)
        if self.flip == "off":
            return [False] * len(keys)
        return [self.dataset.draws_flip(k) for k in keys]


@dataclass
class TrainRun:
    """Both sides trained ``iters`` iterations in one precision.

    Attributes:
        dtype: "float32" or "float64".
        rows: the compared values of every iteration, in execution order.
        mmdet, paddle: per name of `VALUE_NAMES`, the ``(iters,)`` float64 values.
        iteration_rows: one row of `ITERATION_COLUMNS` per iteration.
        bin_rows: the GHM calls whose bin counts differ (see `ghm_bin_differences`).
        seconds: time in each framework's iterations ("mmdet_s", "paddle_s").
        divergences: each iteration's first disagreement and its cause (`align.engine.divergence`).
    """

    dtype: str
    rows: list[TensorDiff]
    mmdet: dict[str, np.ndarray]
    paddle: dict[str, np.ndarray]
    iteration_rows: list[IterationRow]
    bin_rows: list[BinRow]
    seconds: dict[str, float]
    divergences: list[Divergence] = field(default_factory=list)

    def rel(self, name: str) -> np.ndarray:
        """``(iters,)`` ``|paddle - mmdet| / |mmdet|`` of a `VALUE_NAMES` entry."""
        return np.abs(self.paddle[name] - self.mmdet[name]) / np.abs(self.mmdet[name])

    def first_bin_difference(self) -> str | None:
        r = self.bin_rows[0] if self.bin_rows else None
        return None if r is None else (f"iteration {r.iter}, {r.loss} {r.level} "
                                       f"(bins {r.bins}: {r.mmdet_counts} vs {r.paddle_counts})")

    def summary(self) -> dict:
        """The run's figures for the report's meta."""
        loss_rel, norm_rel = self.rel("loss"), self.rel("grad_norm")
        return {
            "worst_loss_rel_diff": float(loss_rel.max()),
            "worst_loss_rel_diff_iteration": int(loss_rel.argmax()) + 1,
            "worst_grad_norm_rel_diff": float(norm_rel.max()),
            "worst_grad_norm_rel_diff_iteration": int(norm_rel.argmax()) + 1,
            "loss_rel_diff_per_iteration": [float(v) for v in loss_rel],
            "grad_norm_rel_diff_per_iteration": [float(v) for v in norm_rel],
            "first_ghm_bin_count_difference": self.first_bin_difference(),
            "ghm_calls_with_bin_count_differences": len(self.bin_rows),
            "iterations_with_a_disagreement": len(self.divergences),
            "unexplained_disagreements": sum(d.verdict == "unexplained" for d in self.divergences),
            **{k: round(v, 2) for k, v in self.seconds.items()},
        }


@dataclass
class TrainData:
    """The datasets and the batch plan both runs share."""

    cfg: object
    root: Path
    mm_ds: dict[bool, object]  # flip forced on (True) / off (False)
    our_ds: object
    plan: BatchPlan


def train_pair(opts: TrainOptions, dtype: str, data: TrainData, ckpts: Checkpoints, warmup: int) -> TrainRun:
    """Train mmdet's model and ours ``opts.iters`` iterations in ``dtype``, in lockstep."""
    from paddle_impl.data.transforms import Collate

    plan, our_ds = data.plan, data.our_ds
    settings = dict(lr=opts.lr, warmup=warmup, iters_per_epoch=plan.iters_per_epoch, terms=summed_terms)
    mmdet = MmdetSide(build_torch_model(ckpts, dtype), cfg=data.cfg, **settings)
    paddle = PaddleSide.from_config(build_paddle_model(ckpts, dtype), **settings)
    collate = Collate()
    t_head, p_head = mmdet.model.bbox_head, paddle.model.bbox_head
    # Per-element g of the GHM calls only where a divergence is expected to need them.
    keep_g = dtype == "float32"
    recorders = {"ghmc": (TorchGHMRecorder(t_head.loss_cls, "cls", keep_g), PaddleGHMRecorder(p_head.loss_cls, keep_g)),
                 "ghmr": (TorchGHMRecorder(t_head.loss_bbox, "bbox", keep_g),
                          PaddleGHMRecorder(p_head.loss_bbox, keep_g))}
    census, bin_flips = ReluMaskCensus(mmdet.model, paddle.model), BinFlips(recorders)
    causes: dict[int, list] = {}

    def after_step(record) -> list:
        census.finish_step()
        causes[record.step] = [c for c in (relu_flips(census.step_layers), bin_flips.explanation(record.step))
                               if c is not None]
        return []

    planned = []

    def batches():
        for it in range(opts.iters):
            keys = plan.keys(it)
            flips = plan.flips(keys)
            samples = [our_ds[k] for k in keys]
            if [s["flip"] for s in samples] != flips:
                raise RuntimeError("our dataset flipped differently from the plan")
            planned.append((keys, flips))
            yield (mmdet_batch([data.mm_ds[f][k.index] for k, f in zip(keys, flips)]), collate.batch(samples))

    def tolerance(_step: int, name: str) -> tuple[float, float]:
        return (LR_TOL if name == "lr" else opts.loss_rel_tol), math.inf

    with contextlib.ExitStack() as stack:
        for recorder in (r for pair in recorders.values() for r in pair):
            stack.enter_context(recorder)
        stack.callback(census.remove)
        run = train_in_lockstep(mmdet, paddle, batches(), label=lambda step: f"iter{step:03d}",
                                tolerance=tolerance, before_step=lambda step: census.start_step(),
                                after_step=after_step,
                                progress=lambda items: progress(items, f"train {dtype}", total=opts.iters))
    evidence = [StepEvidence(r.step, [row.name for row in r.rows if not row.passed], causes.get(r.step, []))
                for r in run.steps]
    iteration_rows = []
    for record, (keys, flips) in zip(run.steps, planned):
        t, p = record.reference, record.test
        iteration_rows.append(IterationRow(
            record.step, keys[0].epoch, str([our_ds.img_ids[k.index] for k in keys]), str(flips), t.lr,
            t.losses["loss"], p.losses["loss"], abs(p.losses["loss"] - t.losses["loss"]) / abs(t.losses["loss"]),
            t.grad_norm, p.grad_norm, abs(p.grad_norm - t.grad_norm) / abs(t.grad_norm)))
    return TrainRun(dtype=dtype, rows=run.rows,
                    mmdet={n: np.array(v, np.float64) for n, v in value_series(run, "reference", VALUE_NAMES).items()},
                    paddle={n: np.array(v, np.float64) for n, v in value_series(run, "test", VALUE_NAMES).items()},
                    iteration_rows=iteration_rows, bin_rows=ghm_bin_differences(recorders),
                    seconds={"mmdet_s": run.seconds["mmdet"], "paddle_s": run.seconds["paddle"]},
                    divergences=classify(evidence, row_kind))


def run_train(opts: TrainOptions) -> StageResult:
    """Train both sides ``opts.iters`` iterations in ``opts.dtype`` (and ``opts.extra_dtype``),
    diff the checked run, write ``train_align*`` files into ``opts.reports``."""
    from align.engine.figures import loss_curves_png

    if opts.iters < 1:
        raise ValueError(f"iters must be at least 1, got {opts.iters}")
    if opts.flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {opts.flip!r}")
    if not (opts.lr > 0 and math.isfinite(opts.lr)):
        raise ValueError(f"lr must be a positive number, got {opts.lr}")
    for dtype in (opts.dtype, opts.extra_dtype):
        if dtype is not None and dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {dtype!r}")
    warmup = opts.warmup_iters if opts.warmup_iters is not None else max(1, opts.iters // 2)
    if warmup < 1:
        raise ValueError(f"warmup iterations must be at least 1, got {warmup}")

    root = tiny_coco_root(opts.build_dir, opts.seed)
    cfg = mmdet_setup()
    mm_ds = {flip: mmdet_dataset(cfg, root, train=True, scale=opts.scale, flip_prob=1.0 if flip else 0.0)
             for flip in (True, False)}
    our_ds = our_dataset(root, train=True, scale=opts.scale, flip=None, seed=opts.seed)
    mm_ids = [mm_ds[False].get_data_info(i)["img_id"] for i in range(len(mm_ds[False]))]
    if mm_ids != our_ds.img_ids:
        raise ValueError(f"the two training sets list different images ({mm_ids} vs {our_ds.img_ids}); "
                         f"run python -m align.data")
    data = TrainData(cfg=cfg, root=root, mm_ds=mm_ds, our_ds=our_ds, plan=BatchPlan(our_ds, opts.flip))
    ckpts = prepare_checkpoints(opts.ckpt, opts.seed, opts.build_dir)

    main = train_pair(opts, opts.dtype, data, ckpts, warmup)
    extra = (train_pair(opts, opts.extra_dtype, data, ckpts, warmup)
             if opts.extra_dtype not in (None, opts.dtype) else None)

    rows = main.rows
    reprod = reprod_log_diff(main.paddle, main.mmdet, opts.reports, STAGE, opts.loss_rel_tol)

    summary = main.summary()
    meta = {
        "seed": opts.seed,
        "tiny_coco": str(root),
        "train_images": our_ds.img_ids,
        "resize_scale": list(opts.scale),
        "iterations": opts.iters,
        "iters_per_epoch": data.plan.iters_per_epoch,
        "batch_size": BATCH_SIZE,
        "base_lr": opts.lr,
        "warmup_iters": warmup,
        "flip": opts.flip,
        "dtype": main.dtype,
        "extra_dtype": extra.dtype if extra else None,
        **{k: v for k, v in summary.items() if not k.endswith("_per_iteration")},
        "checkpoint": str(ckpts.torch_path),
        "checkpoint_sha256": ckpts.sha256,
        "checkpoint_synthetic": ckpts.synthetic,
        "runs": {run.dtype: {"role": "checked" if run is main else "informational, not part of the verdict",
                             **run.summary()}
                 for run in (main, extra) if run is not None},
    }
    tables = [(f"Loss per iteration, {main.dtype} (checked)", ITERATION_COLUMNS, main.iteration_rows),
              (f"GHM calls whose bin counts differ, {main.dtype} (first 20; diagnosis, not part of the verdict)",
               BIN_COLUMNS, main.bin_rows[:20])]
    if extra is not None:
        tables += [(f"Loss per iteration, {extra.dtype} (informational, not part of the verdict)",
                    ITERATION_COLUMNS, extra.iteration_rows),
                   (f"GHM calls whose bin counts differ, {extra.dtype} (first 20; informational)",
                    BIN_COLUMNS, extra.bin_rows[:20])]
    for run in (main, extra):
        if run is not None and run.divergences:
            tables.append((f"First disagreement per iteration and its cause, {run.dtype} (unexplained fails the stage)",
                           ["iteration", "first disagreeing row", "verdict", "cause", "elements", "detail"],
                           run.divergences))
    curves_title = (f"Total loss per iteration, {main.dtype} (left), and |paddle - mmdet| / |mmdet| "
                    f"(right, log scale){f', with the {extra.dtype} run for comparison' if extra else ''}")
    return write_report(StageResult(
        stage=STAGE,
        title="Train: K iterations on the tiny COCO, mmdet vs Paddle, each with its own pipeline",
        # A run whose first disagreement in some iteration has no rounding-level cause fails, whatever its precision.
        passed=all(row.passed for row in rows) and all(explained(r.divergences) for r in (main, extra) if r),
        tensors=rows,
        thresholds={"precision of the checked run": main.dtype,
                    "losses, grad norm (rel)": opts.loss_rel_tol, "lr (rel)": LR_TOL},
        meta=meta,
        extra_tables=tables,
        figures=[(curves_title, loss_curves_png(
            main.mmdet["loss"], main.paddle["loss"], opts.loss_rel_tol, label=main.dtype,
            extra=(extra.dtype, extra.mmdet["loss"], extra.paddle["loss"]) if extra else None,
            names=("mmdet", "paddle")))],
        reprod_log=reprod,
        reprod_log_check=opts.loss_rel_tol,
        reprod_log_why=(f"losses and gradient norms are bounded relative to their size (rel "
                        f"{opts.loss_rel_tol:.0e}), where reprod_log bounds the absolute difference"),
        headline=Headline.worst(rows, opts.loss_rel_tol, f"worst loss or grad norm ({main.dtype}), rel"),
        seconds={"mmdet": main.seconds["mmdet_s"], "paddle": main.seconds["paddle_s"]},
        side_run=_side_run(extra) if extra else "",
    ), opts.reports)


def ghm_bin_differences(recorders: dict) -> list[BinRow]:
    """Every GHM call whose bin counts differ between the sides, in call order
    (5 calls per iteration, one per level)."""
    rows = []
    for kind, (t_rec, p_rec) in recorders.items():
        for call, (t_counts, p_counts) in enumerate(zip(t_rec.counts, p_rec.counts)):
            if np.array_equal(t_counts, p_counts):
                continue
            bins = np.flatnonzero(t_counts != p_counts)
            rows.append(BinRow(call // len(LEVELS) + 1, kind, LEVELS[call % len(LEVELS)], str(bins.tolist()),
                               str(t_counts[bins].tolist()), str(p_counts[bins].tolist())))
    rows.sort(key=lambda r: (r.iter, LEVELS.index(r.level)))
    return rows


def _side_run(run: TrainRun) -> str:
    s = run.summary()
    return (f"{run.dtype}: worst loss rel {s['worst_loss_rel_diff']:.2e} (iteration "
            f"{s['worst_loss_rel_diff_iteration']}), first GHM bin-count difference: "
            f"{s['first_ghm_bin_count_difference'] or 'none'}; {describe(run.divergences, 'iteration')}")


def first_divergence(result: StageResult) -> str | None:
    return first_failed_name(result.tensors)
