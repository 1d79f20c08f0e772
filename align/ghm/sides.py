"""mmdet's and Paddle's training sides of the GHM RetinaNet, for the engine's paired loop.

Both sides implement `align.engine.paired.Side` from the configuration of
their own framework: mmdet's with mmengine's ``OptimWrapper`` and
``param_scheduler`` built from mmdet's config (the learning rate, warm-up
length and clipping bound replaced as a stage asks), ours with the engine's
``SGD``, ``WarmupMultiStepLR`` and `paddle_impl.engine.train_step.train_step`.
The backward stage, the train stage and the training benchmarks all train
through these two classes.

A batch is given to each side in its own form:

- mmdet: `FakeInputs` (normalized images and seeded ground truth, fed to
  ``model.loss`` as the backward stage does), or the ``dict(inputs=...,
  data_samples=...)`` of mmdet's own pipeline, which goes through mmdet's
  ``model.train_step`` (data preprocessor included) unchanged;
- Paddle: the batch dict of `paddle_impl.engine.train_step.train_step`
  (`paddle_batch` makes one from `FakeInputs`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

from align.engine.paired import StepValues
from align.ghm.fake_batch import FakeBatch
from align.ghm.pair import LEVELS

GHM_LOSSES = ("bbox_head.loss_cls", "bbox_head.loss_bbox")

# Loss dict (``{'loss_cls': [5 level scalars], 'loss_bbox': [...]}``, torch or Paddle) -> named terms.
LossTerms = Callable[[Mapping[str, Any]], dict[str, float]]


def level_terms(losses: Mapping[str, Any]) -> dict[str, float]:
    """Each level's loss, each loss's sum over the levels and the total, as float64 host values."""
    out: dict[str, float] = {}
    for kind in ("loss_cls", "loss_bbox"):
        values = [float(v.detach()) for v in losses[kind]]
        for name, v in zip(LEVELS, values):
            out[f"{kind}.{name}"] = np.float64(v)
        out[f"{kind}.sum"] = np.float64(sum(values))
    out["loss.total"] = out["loss_cls.sum"] + out["loss_bbox.sum"]
    return out


def summed_terms(losses: Mapping[str, Any]) -> dict[str, float]:
    """``loss_cls``, ``loss_bbox`` (each summed over the levels in the framework, as mmdet's
    ``parse_losses`` does) and their total ``loss``."""
    cls, bbox = sum(losses["loss_cls"]), sum(losses["loss_bbox"])
    return {"loss_cls": float(cls.detach()), "loss_bbox": float(bbox.detach()),
            "loss": float((cls + bbox).detach())}


@dataclass
class FakeInputs:
    """A batch of the backward stage: ``(N, 3, H, W)`` float32 normalized images and their ground truth."""

    images: np.ndarray
    truth: FakeBatch


def paddle_batch(inputs: FakeInputs) -> dict[str, Any]:
    """`FakeInputs` as the batch dict of Paddle's ``train_step``."""
    t = inputs.truth
    return {"images": inputs.images, "gt_bboxes": t.gt_bboxes, "gt_labels": t.gt_labels,
            "pad_shapes": t.pad_shapes}


class MmdetSide:
    """mmdet's model trained with mmengine's optimizer wrapper and schedulers, built from mmdet's config.

    Args:
        model: mmdet's detector (see `align.ghm.pair.build_torch_model`).
        lr: base learning rate; warmup: warm-up length in iterations;
        iters_per_epoch: when the by-epoch schedulers step.
        max_norm: the clipping bound (None: the config's).
        terms: names the loss terms of a step (`level_terms` or `summed_terms`).
        cfg: mmdet's config (default: the reference config).
    """

    name = "mmdet"

    def __init__(self, model, *, lr: float, warmup: int, iters_per_epoch: int,
                 max_norm: Optional[float] = None, terms: LossTerms = level_terms, cfg=None):
        import torch
        from mmengine.optim import build_optim_wrapper
        from mmengine.registry import PARAM_SCHEDULERS

        from torch_ref.reference import load_config

        cfg = load_config() if cfg is None else cfg
        optim_cfg = copy.deepcopy(cfg.optim_wrapper)
        optim_cfg.optimizer.lr = lr
        if max_norm is not None:
            optim_cfg.clip_grad.max_norm = max_norm
        self.max_norm = float(optim_cfg.clip_grad.max_norm)
        self.model = model
        self.model.train()
        self.dtype = next(model.parameters()).dtype
        self.terms = terms
        if self.dtype != torch.float32:
            # module.double() also widened the preprocessor's mean and std
            # buffers, which would normalize in float64 instead of as mmdet does.
            model.data_preprocessor.float()
            model.data_preprocessor.register_forward_hook(self._widen_inputs)
        self.wrapper = build_optim_wrapper(model, optim_cfg)
        # The hook between backward and the update, on this instance's backward.
        self._backward, self._after_backward = self.wrapper.backward, None
        self.wrapper.backward = self._backward_then_hook
        model.register_forward_hook(self._keep_losses)
        self._losses = None
        self.iters_per_epoch = iters_per_epoch
        self.iteration = 0
        self.schedulers = []
        for sched_cfg in cfg.param_scheduler:
            sched_cfg = copy.deepcopy(sched_cfg)
            if not sched_cfg.get("by_epoch", True):
                sched_cfg["end"] = warmup
            else:
                sched_cfg.setdefault("end", cfg.train_cfg.max_epochs)
            self.schedulers.append(PARAM_SCHEDULERS.build(
                sched_cfg, default_args=dict(optimizer=self.wrapper, epoch_length=iters_per_epoch)))

    def _widen_inputs(self, _module, _args, output: dict) -> dict:
        """The preprocessor's ``inputs`` ``(N, 3, H, W)`` float32 -> the model's dtype."""
        output["inputs"] = output["inputs"].to(self.dtype)
        return output

    def _keep_losses(self, _module, _args, output) -> None:
        # mmdet's train_step hands back only the summed log values; the level losses are its forward's output.
        if isinstance(output, dict) and "loss_cls" in output:
            self._losses = output

    def _backward_then_hook(self, loss, **kwargs) -> None:
        self._backward(loss, **kwargs)
        if self._after_backward is not None:
            self._after_backward()

    def train_step(self, batch, after_backward: Optional[Callable[[], None]] = None) -> StepValues:
        """One update on `FakeInputs` (``model.loss``) or on pipeline data (mmdet's ``model.train_step``)."""
        import torch
        from mmengine.logging import MessageHub

        lr = self.wrapper.optimizer.param_groups[0]["lr"]
        self._after_backward, self._losses = after_backward, None
        try:
            if isinstance(batch, FakeInputs):
                losses = self.model.loss(torch.from_numpy(batch.images).to(self.dtype), data_samples(batch.truth))
                parsed, _ = self.model.parse_losses(losses)
                self.wrapper.update_params(parsed)
            else:
                self.model.train_step(batch, self.wrapper)
                losses = self._losses
        finally:
            self._after_backward = None
        grad_norm = MessageHub.get_current_instance().get_scalar("train/grad_norm").current()
        self.iteration += 1
        for s in self.schedulers:
            if not s.by_epoch or self.iteration % self.iters_per_epoch == 0:
                s.step()
        return StepValues(losses=self.terms(losses), grad_norm=float(grad_norm), lr=float(lr))

    def gradients(self) -> dict:
        return {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}

    def parameters(self) -> dict:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def state(self) -> dict[str, dict]:
        """``momentum``: SGD's buffers by parameter name; ``ghm``: the GHM losses' ``acc_sum``."""
        opt_state = self.wrapper.optimizer.state
        buffers = dict(self.model.named_buffers())
        return {"momentum": {n: opt_state[p]["momentum_buffer"] for n, p in self.model.named_parameters()
                             if p in opt_state and "momentum_buffer" in opt_state[p]},
                "ghm": {f"{m}.acc_sum": buffers[f"{m}.acc_sum"] for m in GHM_LOSSES}}


def data_samples(truth: FakeBatch) -> list:
    """mmdet's ``DetDataSample`` list of a fake batch's ground truth and image metas."""
    import torch
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    samples = []
    for b, l, s, p in zip(truth.gt_bboxes, truth.gt_labels, truth.img_shapes, truth.pad_shapes):
        ds = DetDataSample(metainfo=dict(img_shape=s, pad_shape=p, batch_input_shape=truth.batch_shape,
                                         scale_factor=(1.0, 1.0)))
        ds.gt_instances = InstanceData(bboxes=torch.from_numpy(b), labels=torch.from_numpy(l))
        samples.append(ds)
    return samples


class PaddleSide:
    """Our model with its optimizer and schedule, stepped by the engine's ``train_step``.

    Args:
        model: our RetinaNet (see `align.ghm.pair.build_paddle_model`).
        optimizer: `paddle_impl.engine.optimizer.SGD` over the model;
        schedule: `paddle_impl.engine.lr_schedule.WarmupMultiStepLR`.
        max_norm: the clipping bound (None: the configuration's).
        terms: names the loss terms of a step.
        loss_forward: what computes the loss dict (default ``model.loss``;
            a `paddle_impl.engine.train_step.LossForward`, possibly in
            ``paddle.DataParallel``, as the training program uses).
    """

    name = "paddle"

    def __init__(self, model, optimizer, schedule, *, max_norm: Optional[float] = None,
                 terms: LossTerms = level_terms, loss_forward: Optional[Callable] = None):
        from paddle_impl.config import get_config

        self.model = model
        self.model.train()
        self.optimizer, self.schedule = optimizer, schedule
        self.max_norm = get_config()["optimizer"]["clip_grad_max_norm"] if max_norm is None else max_norm
        self.terms = terms
        self.loss_forward = model.loss if loss_forward is None else loss_forward
        self.last = None  # the last step's StepResult

    @classmethod
    def from_config(cls, model, *, lr: float, warmup: int, iters_per_epoch: int,
                    max_norm: Optional[float] = None, terms: LossTerms = level_terms) -> "PaddleSide":
        """``SGD`` and ``WarmupMultiStepLR`` from our configuration, with the learning rate,
        warm-up length and epoch length given (as `MmdetSide` takes them)."""
        from paddle_impl.config import get_config
        from paddle_impl.engine.lr_schedule import WarmupMultiStepLR
        from paddle_impl.engine.optimizer import SGD

        o = get_config()["optimizer"]
        schedule = WarmupMultiStepLR(
            base_lr=lr, iters_per_epoch=iters_per_epoch, warmup_start_factor=o["warmup_start_factor"],
            warmup_iters=warmup, milestones=o["milestones"], gamma=o["gamma"], max_epochs=o["max_epochs"])
        return cls(model, SGD(model, lr=lr), schedule, max_norm=max_norm, terms=terms)

    def train_step(self, batch, after_backward: Optional[Callable[[], None]] = None) -> StepValues:
        """One update on a batch dict (or `FakeInputs`) through the engine's ``train_step``."""
        from paddle_impl.engine.train_step import train_step

        if isinstance(batch, FakeInputs):
            batch = paddle_batch(batch)
        self.last = train_step(self.loss_forward, self.optimizer, self.schedule, batch,
                               max_norm=self.max_norm, after_backward=after_backward)
        return StepValues(losses=self.terms(self.last.losses), grad_norm=self.last.grad_norm, lr=self.last.lr)

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

    def state(self) -> dict[str, dict]:
        """``momentum``: SGD's buffers by parameter name; ``ghm``: the GHM losses' ``acc_sum``."""
        buffers = dict(self.model.named_buffers())
        return {"momentum": dict(self.optimizer.momentum_buffers()),
                "ghm": {f"{m}.acc_sum": buffers[f"{m}.acc_sum"] for m in GHM_LOSSES}}
