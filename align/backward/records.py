"""What the backward stage is given and what one of its runs records: its options (which make its
command line) and one run of both sides in one precision (`PairRun`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.engine.compare import TensorDiff
from align.engine.divergence import Divergence
from align.engine.options import cache_option, fresh_option, option, same_option
from align.forward.stage import ForwardOptions
from align.ghm.pair import GhmStageOptions, dtype_option, extra_dtype_option
from common.arguments import non_negative, non_negative_float, positive, positive_float, tensor_shape

DEFAULT_SHAPE = "2x3x320x480"
# COCO train2017 after filtering images without boxes (117266), 16 images per step.
DEFAULT_ITERS_PER_EPOCH = 7330
# The optimizers a pair trains with, each framework's own (`align.pair.optimizers`).
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclass
class BackwardOptions(GhmStageOptions):
    """Settings of the backward stage.

    ``dtype`` is the precision of the run whose figures decide the verdict;
    ``extra_dtype`` (None: none) a second run measured and reported beside it.
    """

    # The pair: the GHM RetinaNet unless ``torch`` and ``paddle`` name two builders.
    torch: str | None = option(None, "module:function building a torch model to train instead of mmdet's GHM "
                                     "RetinaNet (with --paddle; see align.pair.training)")
    paddle: str | None = option(None, "module:function building the Paddle model to train beside it")
    map: Path | None = option(None, "with --torch: the forward stage's JSON map file; its prefixes, tensor rules "
                                    "and converters carry the weights and name what is trained", type=Path)
    carry: bool = option(True, "with --torch: the builders load equal weights themselves", flag="--no-carry")
    name: str | None = option(None, "with --torch: report file stem (default pair_backward)")
    # The GHM RetinaNet trains with mmengine's optimizer from mmdet's config; a pair with
    # each framework's own optimizer of this kind.
    # Checked with the pair's other options (`align.pair.optimizers.OptimizerSettings`), so a bad
    # value is one line naming it, as a bad --loss is.
    optimizer: str | None = option(None, f"with --torch: {', '.join(OPTIMIZERS)}, each framework's own "
                                         "(default momentum, 0.9)", metavar="|".join(OPTIMIZERS))
    weight_decay: float | None = option(None, "with --torch: weight decay (coupled L2 for sgd, momentum and adam, "
                                              "decoupled for adamw; default 1e-4)", type=non_negative_float)
    loss: str | None = option(None, "with --torch: module:factory; factory('torch') and factory('paddle') return "
                                    "loss(output, inputs) -> scalar (default: sum(output * R), R seeded)")
    shape: str | None = option(None, f"batch NxCxHxW (default {DEFAULT_SHAPE}; with --torch 2x3x32x32)",
                               type=tensor_shape())
    # A pair's named inputs, as the forward stage takes them (seeded again for every step).
    inputs: Path | None = same_option(ForwardOptions, "inputs")
    input: list | None = same_option(ForwardOptions, "input")
    positional: bool = same_option(ForwardOptions, "positional")
    steps: int = option(10, "training steps (default %(default)s)", type=positive, aliases=("--train-steps",))
    lr: float | None = option(None, "base learning rate (default: the config's 0.01 for 16 images, scaled "
                                    "linearly to the batch size; with --torch 0.001)", type=positive_float)
    warmup_iters: int | None = option(None, "linear warm-up length (default: steps // 2)", type=non_negative)
    dtype: str = dtype_option()
    extra_dtype: str | None = extra_dtype_option()
    # None: the configuration's max_norm (35) on both sides. A smaller value
    # makes the clipping act when the gradient norms stay below 35.
    clip_max_norm: float | None = option(None, "gradient clipping at this global L2 norm on both sides (default: "
                                               "the config's; with --torch none)", type=positive_float,
                                         aliases=("--clip-norm",))
    # reprod_log .npy files of both sides (step-1 gradients, final parameters
    # and momentum buffers: four copies of the model, twice that in float64).
    reprod_log: bool = option(True, "skip the reprod_log .npy files (several copies of the model's arrays)",
                              flag="--no-reprod-log")
    # Every leaf layer at step 1 in float32 on mmdet's recorded input and output gradient
    # (its own forward and backward error), beside the training runs.
    isolate: bool = option(False, "also every layer at step 1 on mmdet's recorded input and output gradient "
                                  "(float32)")
    isolate_tol: float = 1e-5
    # The whole-schedule learning-rate comparison (0: skipped).
    schedule_iters_per_epoch: int = option(DEFAULT_ITERS_PER_EPOCH, "iterations per epoch of the whole-schedule "
                                           "learning-rate comparison (default %(default)s: COCO train2017 at 16 "
                                           "images per step; 0 skips it)", type=non_negative, metavar="ITERS_PER_EPOCH",
                                           flag="--iters-per-epoch")
    grad_tol: float = 1e-5
    loss_tol_first: float = 1e-5
    loss_tol: float = 1e-4
    param_tol: float = 1e-4
    # Keep mmdet's side of each run in ``build_dir/cache`` and replay it from there when it
    # matches (see `align.backward.reference`); ``fresh``: recompute it regardless.
    cache: bool = cache_option()
    fresh: bool = fresh_option()
    # Paddle's CPU math threads for the run (None: left as they are; Paddle's default is 1,
    # torch's the number of cores). The command line gives Paddle as many as torch has.
    paddle_threads: int | None = option(None, "Paddle's CPU math threads (default: as many as torch uses, so "
                                              "both sides compute on the same cores)", type=positive)


@dataclass
class PairRun:
    """One training run of both sides in one precision (`align.backward.lockstep.train_run`).

    Attributes:
        dtype: "float32" or "float64".
        rows: the checked rows: every step's losses, gradient norm and lr,
            step 1's gradients, the final parameters and every optimizer state group.
        steps: per-step rows (`align.backward.lockstep.step_row_type`), including the
            informational worst gradient, parameter and state differences of every step.
        relu_layers: step 1's ReLU census (see `ReluMaskCensus.layers`).
        largest_change: largest |change| of a reference parameter over the run.
        relative_change: (median, max) over the reference's parameters of their
            largest |change| divided by their largest initial |value|.
        seconds: time in each framework's steps ("<reference>_s", "paddle_s").
        logs: (reference, paddle) arrays of ``rows`` when kept, for reprod_log.
        divergences: each step's first disagreement and its cause (`align.engine.divergence`).
        reference_cache: how the reference side was obtained (`align.backward.lockstep.RunSides.cache`);
        reference_check_s: the time spent reading and checking it in the cache.
        bounds: the run's `align.backward.lockstep.Bounds`.
        losses: (reference, paddle) total loss per step.
        step_columns: the column titles of ``steps``.
    """

    dtype: str
    rows: list[TensorDiff]
    steps: list
    relu_layers: dict[str, list]
    largest_change: float
    relative_change: tuple[float, float]
    seconds: dict[str, float]
    logs: tuple[dict, dict] | None = field(default=None, repr=False)
    divergences: list[Divergence] = field(default_factory=list)
    reference_cache: str = "off"
    reference_check_s: float = 0.0
    bounds: Any = None
    losses: tuple[list, list] = ([], [])
    step_columns: list = field(default_factory=list)
