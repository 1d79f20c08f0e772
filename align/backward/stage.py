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

import copy
import dataclasses
import io
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from align.compare import TensorDiff, diff_arrays, first_failure, missing_row, reprod_log_diff
from align.ghm_pair import (BUILD_DIR, MODEL_DTYPES, Checkpoints, build_paddle_model,
                            build_torch_model, parse_shape, prepare_checkpoints, seeded_images)
from align.loss.fake_batch import FakeBatch, random_batch
from align.loss.stage import loss_terms
from align.report import StageResult, environment_info, write_stage_report

DEFAULT_SHAPE = "2x3x320x480"
# COCO train2017 after filtering images without boxes (117266), 16 images per step.
DEFAULT_ITERS_PER_EPOCH = 7330
LR_TOL = 1e-12
GHM_LOSSES = ("bbox_head.loss_cls", "bbox_head.loss_bbox")


@dataclass
class BackwardOptions:
    """Settings of the backward stage.

    ``dtype`` is the precision of the run whose figures decide the verdict;
    ``extra_dtype`` (None: none) a second run measured and reported beside it.
    """

    ckpt: str | None = None
    shape: str = DEFAULT_SHAPE
    seed: int = 0
    steps: int = 10
    lr: float | None = None  # default: scaled_lr(batch size)
    warmup_iters: int | None = None  # default: steps // 2
    dtype: str = "float64"
    extra_dtype: str | None = "float32"
    # None: the configuration's max_norm (35) on both sides. A smaller value
    # makes the clipping act when the gradient norms stay below 35.
    clip_max_norm: float | None = None
    # reprod_log .npy files of both sides (step-1 gradients, final parameters
    # and momentum buffers: four copies of the model, twice that in float64).
    reprod_log: bool = True
    # The whole-schedule learning-rate comparison (0: skipped).
    schedule_iters_per_epoch: int = DEFAULT_ITERS_PER_EPOCH
    grad_tol: float = 1e-5
    loss_tol_first: float = 1e-5
    loss_tol: float = 1e-4
    param_tol: float = 1e-4
    reports: Path = Path("reports")
    build_dir: Path = BUILD_DIR


def make_batches(opts: BackwardOptions) -> list[tuple[np.ndarray, FakeBatch]]:
    """One ``((N, 3, H, W) float32 images, ground truth)`` pair per step, seeded."""
    shape = parse_shape(opts.shape)
    return [(seeded_images(shape, opts.seed + 1000 * (k + 1)),
             random_batch(shape[2:], opts.seed + k, num_images=shape[0], empty_image=(k % 4 == 3)))
            for k in range(opts.steps)]


def to_numpy(tensor, keep: bool = True) -> np.ndarray:
    """A numpy array of a torch or Paddle tensor (same shape and dtype).

    With ``keep`` the array is a copy that later in-place updates of the
    tensor leave alone; without it a torch tensor may be returned as a view,
    for a comparison made at once. (Paddle's ``numpy()`` always copies.)
    """
    import torch

    if isinstance(tensor, torch.Tensor):
        array = tensor.detach().cpu().numpy()
        return array.copy() if keep else array
    return tensor.numpy()


class TorchTrainer:
    """mmdet's model trained with mmengine's own optimizer wrapper and schedulers.

    A step is split in two (`forward_backward`, then `optimizer_step`) so the
    gradients can be compared between them.
    """

    def __init__(self, model, opts: BackwardOptions, warmup: int):
        from mmengine.optim import build_optim_wrapper
        from mmengine.registry import PARAM_SCHEDULERS

        from torch_ref.reference import load_config

        cfg = load_config()
        optim_cfg = copy.deepcopy(cfg.optim_wrapper)
        optim_cfg.optimizer.lr = opts.lr
        if opts.clip_max_norm is not None:
            optim_cfg.clip_grad.max_norm = opts.clip_max_norm
        self.max_norm = float(optim_cfg.clip_grad.max_norm)
        self.model = model
        self.model.train()
        self.dtype = next(model.parameters()).dtype
        self.wrapper = build_optim_wrapper(model, optim_cfg)
        self.schedulers = []
        for sched_cfg in cfg.param_scheduler:
            sched_cfg = copy.deepcopy(sched_cfg)
            if not sched_cfg.get("by_epoch", True):
                sched_cfg["end"] = warmup
            else:
                sched_cfg.setdefault("end", cfg.train_cfg.max_epochs)
            self.schedulers.append(PARAM_SCHEDULERS.build(
                sched_cfg, default_args=dict(optimizer=self.wrapper, epoch_length=opts.steps)))

    def forward_backward(self, images: np.ndarray, batch: FakeBatch) -> tuple[dict, float]:
        """Loss and gradients of one batch; returns (per-level losses, lr of this step).

        Args:
            images: ``(N, 3, H, W)`` float32, widened to the model's dtype.
        """
        import torch
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        samples = []
        for b, l, s, p in zip(batch.gt_bboxes, batch.gt_labels, batch.img_shapes, batch.pad_shapes):
            ds = DetDataSample(metainfo=dict(img_shape=s, pad_shape=p, batch_input_shape=batch.batch_shape,
                                             scale_factor=(1.0, 1.0)))
            ds.gt_instances = InstanceData(bboxes=torch.from_numpy(b), labels=torch.from_numpy(l))
            samples.append(ds)
        lr = self.wrapper.optimizer.param_groups[0]["lr"]
        losses = self.model.loss(torch.from_numpy(images).to(self.dtype), samples)
        total = sum(losses["loss_cls"]) + sum(losses["loss_bbox"])
        self.wrapper.backward(total)
        return losses, lr

    def gradients(self) -> dict:
        """Gradient tensors of the parameters that have one, by name."""
        return {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}

    def optimizer_step(self) -> float:
        """Clip, update, zero the gradients, advance the iteration schedulers; the norm before clipping."""
        from mmengine.logging import MessageHub

        self.wrapper.step()
        self.wrapper.zero_grad()
        grad_norm = MessageHub.get_current_instance().get_scalar("train/grad_norm").current()
        for s in self.schedulers:
            if not s.by_epoch:
                s.step()
        return float(grad_norm)

    def parameters(self) -> dict:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def momentum_buffers(self) -> dict:
        state = self.wrapper.optimizer.state
        return {n: state[p]["momentum_buffer"]
                for n, p in self.model.named_parameters() if p in state and "momentum_buffer" in state[p]}

    def ghm_buffers(self) -> dict:
        buffers = dict(self.model.named_buffers())
        return {f"{m}.acc_sum": buffers[f"{m}.acc_sum"] for m in GHM_LOSSES}


class PaddleTrainer:
    """Our model with ``SGD``, ``clip_grad_norm_`` and ``WarmupMultiStepLR``."""

    def __init__(self, model, opts: BackwardOptions, warmup: int):
        from paddle_impl.config import get_config
        from paddle_impl.engine.lr_schedule import WarmupMultiStepLR
        from paddle_impl.engine.optimizer import SGD

        o = get_config()["optimizer"]
        self.model = model
        self.model.train()
        self.dtype = str(model.parameters()[0].dtype).replace("paddle.", "")
        self.optimizer = SGD(model, lr=opts.lr)
        self.schedule = WarmupMultiStepLR(
            base_lr=opts.lr, iters_per_epoch=opts.steps, warmup_start_factor=o["warmup_start_factor"],
            warmup_iters=warmup, milestones=o["milestones"], gamma=o["gamma"], max_epochs=o["max_epochs"])
        self.max_norm = o["clip_grad_max_norm"] if opts.clip_max_norm is None else opts.clip_max_norm

    def step(self, images: np.ndarray, batch: FakeBatch,
             after_backward: Callable[[], None] | None = None) -> tuple[dict, float, float]:
        """The engine's training step; ``after_backward`` sees the gradients before the update.

        Returns the loss tensors per level, the learning rate and the gradient norm.
        """
        from paddle_impl.engine.train_step import train_step

        result = train_step(self.model.loss, self.optimizer, self.schedule,
                            {"images": images, "gt_bboxes": batch.gt_bboxes, "gt_labels": batch.gt_labels,
                             "pad_shapes": batch.pad_shapes},
                            max_norm=self.max_norm, after_backward=after_backward)
        return result.losses, result.lr, result.grad_norm

    def gradients(self) -> dict:
        return {n: p.grad for n, p in self.model.named_parameters()
                if p.grad is not None and not p.stop_gradient}

    def parameters(self) -> dict:
        """Parameters by name, without BatchNorm's running statistics: Paddle
        keeps those as (non-trainable) parameters, mmdet as buffers."""
        import paddle

        statistics = {f"{name}.{stat}" for name, layer in self.model.named_sublayers()
                      if isinstance(layer, paddle.nn.BatchNorm2D) for stat in ("_mean", "_variance")}
        return {n: p for n, p in self.model.named_parameters() if n not in statistics}

    def momentum_buffers(self) -> dict:
        return dict(self.optimizer.momentum_buffers())

    def ghm_buffers(self) -> dict:
        buffers = dict(self.model.named_buffers())
        return {f"{m}.acc_sum": buffers[f"{m}.acc_sum"] for m in GHM_LOSSES}


class ReluMaskCensus:
    """Counts the elements whose ReLU mask differs between mmdet and Paddle.

    During mmdet's forward pass every ``nn.ReLU`` records its mask (output > 0)
    per call; during Paddle's forward pass of the same batch each ReLU call,
    matched by layer name and call index (the layers have the same names and
    run in the same order), compares its mask with mmdet's. mmdet's ReLUs are
    in place, so its pre-activations are not seen; at a disagreement Paddle's
    |pre-activation| shows how close to zero the element was.

    Call `start_step` before each step's mmdet forward pass and
    `finish_step` (the step's flips) after Paddle's; `layers` maps a ReLU
    layer's name to ``[flips, elements, largest |Paddle pre-activation| at a
    flip]`` over all steps so far.
    """

    def __init__(self, torch_model, paddle_model):
        import paddle
        import torch

        self._masks: dict[tuple[str, int], np.ndarray] = {}
        self._torch_calls: Counter[str] = Counter()
        self._paddle_calls: Counter[str] = Counter()
        self.step_flips = 0
        self.layers: dict[str, list] = {}
        self._handles = [m.register_forward_hook(self._torch_hook(n))
                         for n, m in torch_model.named_modules() if isinstance(m, torch.nn.ReLU)]
        self._handles += [l.register_forward_post_hook(self._paddle_hook(n))
                          for n, l in paddle_model.named_sublayers() if isinstance(l, paddle.nn.ReLU)]

    def start_step(self) -> None:
        self._masks.clear()
        self._torch_calls.clear()
        self._paddle_calls.clear()
        self.step_flips = 0

    def finish_step(self) -> int:
        if self._masks:
            raise RuntimeError(f"mmdet's ReLU calls {sorted(self._masks)[:5]} have no Paddle "
                               "counterpart: the execution orders differ")
        return self.step_flips

    def _torch_hook(self, name: str):
        def hook(_module, _inputs, output):
            key = (name, self._torch_calls[name])
            self._torch_calls[name] += 1
            self._masks[key] = (output.detach() > 0).numpy()
        return hook

    def _paddle_hook(self, name: str):
        def hook(_layer, inputs, output):
            key = (name, self._paddle_calls[name])
            self._paddle_calls[name] += 1
            reference = self._masks.pop(key, None)
            mine = (output > 0).numpy()
            if reference is None or reference.shape != mine.shape:
                raise RuntimeError(f"Paddle's ReLU call {key} of shape {mine.shape} has no mmdet "
                                   "counterpart: the execution orders differ")
            flips = reference != mine
            count = int(flips.sum())
            row = self.layers.setdefault(name, [0, 0, 0.0])
            row[0] += count
            row[1] += flips.size
            if count:
                row[2] = max(row[2], float(np.abs(inputs[0].numpy()[flips]).max()))
            self.step_flips += count
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def worst_row(rows: Iterable[TensorDiff]) -> TensorDiff | None:
    """The row with the largest ``rel_max``, a NaN one first; None for no rows."""
    return max(rows, key=lambda r: math.inf if math.isnan(r.rel_max) else r.rel_max, default=None)


def compare_named(prefix: str, reference: Mapping[str, Any], test: Mapping[str, Any], tol: float,
                  logs: tuple[dict, dict] | None = None) -> list[TensorDiff]:
    """One row per tensor of ``reference`` (mmdet's) against ``test`` (ours), by name.

    Rows are named ``{prefix}.{name}``; a name on one side only is a failed
    row. ``logs``, when given, is a ``(mmdet, paddle)`` pair of dicts that
    receives the compared arrays under the row names (for reprod_log).
    Without it the tensors are converted one at a time and dropped, so no
    copy of a whole model is held.
    """
    rows = []
    keep = logs is not None
    for name, tensor in reference.items():
        key = f"{prefix}.{name}"
        ref = to_numpy(tensor, keep)
        if name not in test:
            rows.append(missing_row(key, ref_shape=ref.shape, reason="missing in paddle"))
            continue
        tst = to_numpy(test[name], keep)
        rows.append(diff_arrays(key, ref, tst, rel_tol=tol, mean_tol=tol))
        if logs is not None:
            logs[0][key], logs[1][key] = ref, tst
    for name in sorted(test.keys() - reference.keys()):
        rows.append(missing_row(f"{prefix}.{name}", test_shape=tuple(test[name].shape),
                                reason="missing in mmdet"))
    return rows


def worst_named(prefix: str, reference: Mapping[str, Any], test: Mapping[str, Any]) -> tuple[float, str]:
    """``(max over names of max|test - ref| / max|ref|, its row name)``: the
    informational per-step figure, without the full checks of `diff_arrays`.

    A name on one side only or a shape mismatch counts as NaN, which ranks
    worst; a NaN in the data propagates to NaN as well.
    """
    worst, worst_name = -1.0, ""
    for name in reference.keys() | test.keys():
        if name in reference and name in test:
            ref, tst = to_numpy(reference[name], keep=False), to_numpy(test[name], keep=False)
            if ref.shape != tst.shape:
                rel = math.nan
            elif ref.size == 0:
                rel = 0.0
            else:
                scale = float(np.abs(ref).max())
                diff = float(np.abs(tst - ref).max())
                rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        else:
            rel = math.nan
        if math.isnan(rel) or rel > worst:
            worst, worst_name = rel, f"{prefix}.{name}"
            if math.isnan(rel):
                break
    return worst, worst_name


def compare_scalars(reference: Mapping[str, float], test: Mapping[str, float], tol: float,
                    logs: tuple[dict, dict] | None) -> list[TensorDiff]:
    """Rows for scalars named alike on both sides (losses, norms, learning rates)."""
    rows = []
    for name, ref in reference.items():
        ref, tst = np.float64(ref), np.float64(test[name])
        rows.append(diff_arrays(name, ref, tst, rel_tol=tol, mean_tol=tol))
        if logs is not None:
            logs[0][name], logs[1][name] = ref, tst
    return rows


@dataclass
class StepFigures:
    """The figures of one training step of a run (differences are Paddle vs mmdet)."""

    step: int
    lr: float
    loss_mmdet: float
    loss_paddle: float
    loss_rel: float
    grad_norm_mmdet: float
    grad_norm_paddle: float
    grad_norm_rel: float
    clipped: bool
    worst_grad: tuple[float, str]
    worst_param: tuple[float, str]
    worst_momentum: tuple[float, str]
    worst_ghm: tuple[float, str]
    relu_flips: int


@dataclass
class PairRun:
    """One training run of both models in one precision.

    Attributes:
        dtype: "float32" or "float64".
        rows: the checked rows: every step's losses, gradient norm and lr,
            step 1's gradients, the final parameters, momentum buffers and
            GHM ``acc_sum``.
        steps: per-step figures, including the informational worst gradient,
            parameter and momentum differences of every step.
        relu_layers: step 1's ReLU census (see `ReluMaskCensus.layers`).
        largest_change: largest |change| of an mmdet parameter over the run.
        relative_change: (median, max) over mmdet's parameters of their
            largest |change| divided by their largest initial |value|.
        seconds: time in each framework's steps ("mmdet_s", "paddle_s").
        logs: (mmdet, paddle) arrays of ``rows`` when kept, for reprod_log.
    """

    dtype: str
    rows: list[TensorDiff]
    steps: list[StepFigures]
    relu_layers: dict[str, list]
    largest_change: float
    relative_change: tuple[float, float]
    seconds: dict[str, float]
    logs: tuple[dict, dict] | None = field(default=None, repr=False)


def train_pair(opts: BackwardOptions, dtype: str, ckpts: Checkpoints,
               batches: list[tuple[np.ndarray, FakeBatch]], warmup: int, keep_logs: bool) -> PairRun:
    """Train mmdet's model and ours in ``dtype`` side by side, comparing as they go."""
    torch_side = TorchTrainer(build_torch_model(ckpts, dtype), opts, warmup)
    paddle_side = PaddleTrainer(build_paddle_model(ckpts, dtype), opts, warmup)
    census = ReluMaskCensus(torch_side.model, paddle_side.model)
    logs = ({}, {}) if keep_logs else None
    rows: list[TensorDiff] = []
    steps: list[StepFigures] = []
    relu_layers: dict[str, list] = {}
    seconds = {"mmdet_s": 0.0, "paddle_s": 0.0}
    try:
        for k, (images, batch) in enumerate(batches):
            step, first, last = k + 1, k == 0, k == len(batches) - 1
            census.start_step()
            t0 = time.perf_counter()
            t_losses, t_lr = torch_side.forward_backward(images, batch)
            t1 = time.perf_counter()
            grads: dict = {"seconds": 0.0}

            def compare_gradients() -> None:
                # Between Paddle's backward and its update, mmdet's gradients still in place.
                # Every step's worst difference is reported; step 1's gradients
                # and the last step's state are also checked tensor by tensor.
                start = time.perf_counter()
                if first:
                    grads["rows"] = compare_named("grad", torch_side.gradients(), paddle_side.gradients(),
                                                  opts.grad_tol, logs)
                    grads["worst"] = _worst_of_rows(grads["rows"])
                else:
                    grads["worst"] = worst_named("grad", torch_side.gradients(), paddle_side.gradients())
                grads["seconds"] = time.perf_counter() - start

            p_losses, p_lr, p_norm = paddle_side.step(images, batch, after_backward=compare_gradients)
            t2 = time.perf_counter()
            relu_flips = census.finish_step()
            if first:
                relu_layers = {name: list(row) for name, row in census.layers.items()}
                grad_rows = grads["rows"]
            worst_grad = grads["worst"]
            t3 = time.perf_counter()
            t_norm = torch_side.optimizer_step()
            t4 = time.perf_counter()
            seconds["mmdet_s"] += (t1 - t0) + (t4 - t3)
            seconds["paddle_s"] += (t2 - t1) - grads["seconds"]

            first_tol = opts.loss_tol_first if first else opts.loss_tol
            t_terms, p_terms = step_loss_terms(t_losses, step), step_loss_terms(p_losses, step)
            loss_rows = compare_scalars(t_terms, p_terms, first_tol, logs)
            norm_rows = compare_scalars({f"step{step}.grad_norm": t_norm},
                                        {f"step{step}.grad_norm": p_norm}, first_tol, logs)
            lr_rows = compare_scalars({f"step{step}.lr": t_lr}, {f"step{step}.lr": p_lr}, LR_TOL, logs)
            # Execution order, so the first failed row is the first divergence.
            rows += loss_rows + (grad_rows if first else []) + norm_rows + lr_rows
            if last:
                param_rows = compare_named("param", torch_side.parameters(), paddle_side.parameters(),
                                           opts.param_tol, logs)
                momentum_rows = compare_named("momentum", torch_side.momentum_buffers(),
                                              paddle_side.momentum_buffers(), opts.param_tol, logs)
                ghm_rows = compare_named("ghm", torch_side.ghm_buffers(), paddle_side.ghm_buffers(),
                                         opts.param_tol, logs)
                rows += param_rows + momentum_rows + ghm_rows
                worst_param, worst_momentum = _worst_of_rows(param_rows), _worst_of_rows(momentum_rows)
            else:
                worst_param = worst_named("param", torch_side.parameters(), paddle_side.parameters())
                worst_momentum = worst_named("momentum", torch_side.momentum_buffers(),
                                             paddle_side.momentum_buffers())
            # GHM's region counts jump when an element crosses a region edge:
            # with ReLU masks, the discontinuities that make differences grow.
            worst_ghm = worst_named("ghm", torch_side.ghm_buffers(), paddle_side.ghm_buffers())
            total = f"step{step}.loss.total"
            steps.append(StepFigures(
                step=step, lr=t_lr, loss_mmdet=float(t_terms[total]), loss_paddle=float(p_terms[total]),
                loss_rel=next(r.rel_max for r in loss_rows if r.name == total),
                grad_norm_mmdet=t_norm, grad_norm_paddle=p_norm, grad_norm_rel=norm_rows[0].rel_max,
                clipped=t_norm > torch_side.max_norm,
                worst_grad=worst_grad, worst_param=worst_param, worst_momentum=worst_momentum,
                worst_ghm=worst_ghm, relu_flips=relu_flips))
    finally:
        census.remove()
    initial = build_initial_params(ckpts)
    final = torch_side.parameters()
    changes = [(float(np.abs(to_numpy(final[n]).astype(np.float64) - v).max()), float(np.abs(v).max()))
               for n, v in initial.items() if n in final]
    # Relative to each tensor's largest initial magnitude: how far the run
    # moved the weights on the scale the parameter rows are compared on.
    relative = [change / scale for change, scale in changes if scale > 0]
    return PairRun(dtype=dtype, rows=rows, steps=steps, relu_layers=relu_layers,
                   largest_change=max((c for c, _ in changes), default=0.0),
                   relative_change=(float(np.median(relative)), max(relative)) if relative else (0.0, 0.0),
                   seconds=seconds, logs=logs)


def _worst_of_rows(rows: list[TensorDiff]) -> tuple[float, str]:
    worst = worst_row(rows)
    return (worst.rel_max, worst.name) if worst else (math.nan, "")


def step_loss_terms(losses: dict, step: int) -> dict[str, np.float64]:
    """Per-level loss terms, their sums and the total, named ``step{step}.<term>``."""
    prefix = f"iter{step}."
    return {f"step{step}." + name[len(prefix):]: value
            for name, value in loss_terms(losses, step, lambda v: float(v.detach())).items()}


def build_initial_params(ckpts) -> dict[str, np.ndarray]:
    from torch_ref.reference import load_mmdet_state_dict

    return {k: v.numpy().astype(np.float64) for k, v in load_mmdet_state_dict(ckpts.torch_path).items()}


def row_category(name: str, steps: int) -> str:
    """The summary category of a row of `PairRun.rows`."""
    head, _, rest = name.partition(".")
    fixed = {"grad": "gradients, step 1", "param": f"parameters after step {steps}",
             "momentum": f"momentum buffers after step {steps}", "ghm": f"GHM acc_sum after step {steps}"}
    if head in fixed:
        return fixed[head]
    when = "step 1" if head == "step1" else f"steps 2-{steps}"
    if rest == "lr":
        return "learning rate"
    if rest == "grad_norm":
        return f"gradient norm before clipping, {when}"
    return f"loss terms, {when}"


def category_tolerances(opts: BackwardOptions) -> dict[str, float]:
    """Category -> the relative tolerance its rows are checked with."""
    n = opts.steps
    return {
        "loss terms, step 1": opts.loss_tol_first,
        f"loss terms, steps 2-{n}": opts.loss_tol,
        "gradient norm before clipping, step 1": opts.loss_tol_first,
        f"gradient norm before clipping, steps 2-{n}": opts.loss_tol,
        "learning rate": LR_TOL,
        "gradients, step 1": opts.grad_tol,
        f"parameters after step {n}": opts.param_tol,
        f"momentum buffers after step {n}": opts.param_tol,
        f"GHM acc_sum after step {n}": opts.param_tol,
    }


def summarize(run: PairRun, opts: BackwardOptions) -> list[list]:
    """Rows ``[dtype, category, compared, worst rel, worst tensor, tolerance, all within]``."""
    groups: dict[str, list[TensorDiff]] = {}
    for row in run.rows:
        groups.setdefault(row_category(row.name, opts.steps), []).append(row)
    out = []
    for category, tol in category_tolerances(opts).items():
        rows = groups.get(category, [])
        if rows:
            worst = worst_row(rows)
            out.append([run.dtype, category, len(rows), worst.rel_max, worst.name, tol,
                        all(r.passed for r in rows)])
    return out


def step_table(run: PairRun) -> list[list]:
    return [[s.step, s.lr, s.loss_mmdet, s.loss_paddle, s.loss_rel, s.grad_norm_mmdet,
             s.grad_norm_paddle, s.grad_norm_rel, s.clipped,
             s.worst_grad[0], s.worst_grad[1][len("grad."):],
             s.worst_param[0], s.worst_param[1][len("param."):],
             s.worst_momentum[0], s.worst_ghm[0], s.relu_flips]
            for s in run.steps]


def relu_table(runs: list[PairRun]) -> list[list]:
    """Per ReLU layer with a disagreement in some run: flips per run, elements, pre-activation size."""
    names = sorted({n for r in runs for n, row in r.relu_layers.items() if row[0]})
    rows = []
    for name in names:
        cells: list[Any] = [name]
        for run in runs:
            flips, _, size = run.relu_layers.get(name, [0, 0, 0.0])
            cells += [flips, size]
        cells.append(runs[0].relu_layers.get(name, [0, 0, 0.0])[1])
        rows.append(cells)
    total: list[Any] = ["all ReLU layers"]
    for run in runs:
        total += [sum(r[0] for r in run.relu_layers.values()),
                  max((r[2] for r in run.relu_layers.values()), default=0.0)]
    total.append(sum(r[1] for r in runs[0].relu_layers.values()))
    return rows + [total]


def loss_curve_png(runs: list[PairRun]) -> bytes:
    """Total loss per step of the first run, and the relative difference of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = runs[0]
    steps = np.arange(1, len(main.steps) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [s.loss_mmdet for s in main.steps], "o-", label=f"mmdet ({main.dtype})")
    a.plot(steps, [s.loss_paddle for s in main.steps], "x--", label=f"paddle ({main.dtype})")
    a.set_xlabel("step")
    a.set_ylabel("total loss")
    a.legend()
    for run, marker in zip(runs, "os"):
        # Exact agreement has no logarithm: drawn at the floor of the axis.
        b.semilogy(steps, [max(s.loss_rel, 1e-18) for s in run.steps], marker + "-", label=run.dtype)
    b.set_xlabel("step")
    b.set_ylabel("|paddle - mmdet| / |mmdet|")
    b.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def schedule_comparison(iters_per_epoch: int) -> tuple[TensorDiff, list[list], dict]:
    """Every iteration's learning rate over the config's whole schedule: mmengine's schedulers vs ours.

    Returns the ``(iters_per_epoch * max_epochs,)`` diff row, a table of the
    schedule's boundary iterations and figures for the report's meta.
    """
    from align.schedule import mmengine_lrs, paddle_lrs
    from paddle_impl.config import get_config

    o = get_config()["optimizer"]
    ref, ours = mmengine_lrs(iters_per_epoch), paddle_lrs(iters_per_epoch)
    row = diff_arrays(f"lr_schedule.{o['max_epochs']}_epochs_x_{iters_per_epoch}_iters", ref, ours,
                      rel_tol=LR_TOL, mean_tol=LR_TOL, ref_label="mmengine")
    boundaries = {"first iteration": 0, "last warm-up iteration": o["warmup_iters"] - 1,
                  "first after warm-up": o["warmup_iters"]}
    for m in o["milestones"]:
        boundaries[f"last of epoch {m}"] = m * iters_per_epoch - 1
        boundaries[f"first of epoch {m + 1}"] = m * iters_per_epoch
    boundaries["last iteration"] = ref.size - 1
    table = [[label, it, it // iters_per_epoch + 1, float(ref[it]), float(ours[it]), float(abs(ours[it] - ref[it]))]
             for label, it in boundaries.items() if 0 <= it < ref.size]
    differing = np.flatnonzero(ref != ours)
    meta = {"iters_per_epoch": iters_per_epoch, "iterations": int(ref.size),
            "max_abs_diff": row.max_abs, "iterations_not_bitwise_equal": int(differing.size),
            "first_iteration_not_bitwise_equal": int(differing[0]) if differing.size else None}
    return row, table, meta


def run_backward(opts: BackwardOptions) -> StageResult:
    """Train both in ``opts.dtype`` (and ``opts.extra_dtype``), diff, write ``backward*`` files."""
    from paddle_impl.engine.optimizer import scaled_lr

    for dtype in (opts.dtype, opts.extra_dtype):
        if dtype is not None and dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {dtype!r}")
    if opts.lr is None:
        opts = dataclasses.replace(opts, lr=scaled_lr(parse_shape(opts.shape)[0]))
    warmup = opts.warmup_iters if opts.warmup_iters is not None else max(1, opts.steps // 2)
    ckpts = prepare_checkpoints(opts.ckpt, opts.seed, opts.build_dir)
    batches = make_batches(opts)
    runs = [train_pair(opts, opts.dtype, ckpts, batches, warmup, keep_logs=opts.reprod_log)]
    if opts.extra_dtype not in (None, opts.dtype):
        runs.append(train_pair(opts, opts.extra_dtype, ckpts, batches, warmup, keep_logs=False))
    main = runs[0]
    schedule = (schedule_comparison(opts.schedule_iters_per_epoch)
                if opts.schedule_iters_per_epoch > 0 else None)

    reprod = (reprod_log_diff(main.logs[1], main.logs[0], opts.reports, "backward", opts.loss_tol)
              if opts.reprod_log else {})
    rows = main.rows + ([schedule[0]] if schedule else [])
    passed = all(r.passed for r in rows)
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
        tables.append((f"Per step, {run.dtype} ({role})", step_columns, step_table(run)))
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
    tables.append((f"Parameters ranked by difference after the last step ({main.dtype})",
                   ["parameter", "max abs diff", "rel", "pass"],
                   [[r.name[len("param."):], r.max_abs, r.rel_max, r.passed] for r in ranked[:40]]))

    meta = {
        "seed": opts.seed,
        "input_shape": list(parse_shape(opts.shape)),
        "steps": opts.steps,
        "base_lr": opts.lr,
        "warmup_iters": warmup,
        "clip_max_norm": opts.clip_max_norm,
        "dtype": main.dtype,
        "extra_dtype": runs[1].dtype if len(runs) > 1 else None,
        "largest_parameter_change_mmdet": main.largest_change,
        "parameter_change_relative_mmdet": dict(zip(("median", "max"), main.relative_change)),
        "lr_schedule": schedule[2] if schedule else None,
        "checkpoint": str(ckpts.torch_path),
        "checkpoint_sha256": ckpts.sha256,
        "checkpoint_synthetic": ckpts.synthetic,
        **{k: round(v, 3) for k, v in main.seconds.items()},
        "runs": {run.dtype: {
            "largest_parameter_change_mmdet": run.largest_change,
            "parameter_change_relative_mmdet": dict(zip(("median", "max"), run.relative_change)),
            "relu_mask_flips_step1": sum(r[0] for r in run.relu_layers.values()),
            **{k: round(v, 3) for k, v in run.seconds.items()},
            "worst": {row[1]: {"rel": row[3], "tensor": row[4], "within": row[6]}
                      for row in summaries if row[0] == run.dtype},
        } for run in runs},
    }
    result = StageResult(
        stage="backward",
        title="Backward: training steps, mmdet vs Paddle",
        passed=passed,
        tensors=rows,
        layers=[],
        thresholds={"precision of the checked run": main.dtype,
                    "step-1 gradients (rel)": opts.grad_tol,
                    "step-1 losses, grad norm (rel)": opts.loss_tol_first,
                    "later losses, grad norms (rel)": opts.loss_tol,
                    "parameters, momentum, GHM acc_sum after the last step (rel)": opts.param_tol,
                    "lr, per step and over the whole schedule (rel)": LR_TOL},
        meta=meta,
        env=environment_info(),
        extra_tables=tables,
        figures=[("Total loss per step and relative difference", loss_curve_png(runs))],
        reprod_log=reprod,
    )
    write_stage_report(result, opts.reports)
    return result


def first_divergence(result: StageResult) -> str | None:
    index = first_failure(result.tensors)
    return None if index is None else result.tensors[index].name
