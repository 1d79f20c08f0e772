"""One training step of the detector: the only place the Paddle model is updated.

mmengine's ``OptimWrapper.update_params`` in order: the loss of the batch
(summed as mmdet's ``parse_losses`` sums it: the levels of each loss, then the
two sums), backward, gradient clipping by global norm, the SGD update, the
gradients cleared, the learning-rate schedule advanced. The training program,
the alignment stages and the benchmarks all call :func:`train_step`; what
they need to see in between (gradients before the update, a data-parallel
reduction) goes through ``after_backward``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import paddle
from paddle import nn

from paddle_impl.errors import NonFiniteLossError


class LossForward(nn.Layer):
    """The detector's training loss as ``forward``, so that ``paddle.DataParallel`` sees the call
    (it prepares its gradient all-reduce on the tensors ``forward`` returns)."""

    def __init__(self, detector: nn.Layer):
        super().__init__()
        self.detector = detector

    def forward(self, images, gt_bboxes, gt_labels, pad_shapes) -> dict[str, list[paddle.Tensor]]:
        """See :meth:`RetinaNet.loss`: ``{'loss_cls': [5 scalars], 'loss_bbox': [5 scalars]}``."""
        return self.detector.loss(images, gt_bboxes, gt_labels, pad_shapes)


@dataclass
class StepResult:
    """What one step computed: host values for logs and comparisons, and the level tensors."""

    lr: float
    loss_cls: float
    loss_bbox: float
    loss: float
    loss_cls_levels: list[float]
    loss_bbox_levels: list[float]
    grad_norm: float
    losses: dict[str, list[paddle.Tensor]] = field(repr=False)

    def log_values(self) -> dict[str, Any]:
        """The fields the training log records per iteration."""
        return {"lr": self.lr, "loss_cls": self.loss_cls, "loss_bbox": self.loss_bbox, "loss": self.loss,
                "loss_cls_levels": self.loss_cls_levels, "loss_bbox_levels": self.loss_bbox_levels}


def train_step(loss_forward: Callable[..., Mapping[str, list[paddle.Tensor]]], optimizer, schedule,
               batch: Mapping[str, Any], *, max_norm: Optional[float] = None,
               after_backward: Optional[Callable[[], None]] = None,
               iteration: Optional[int] = None) -> StepResult:
    """One optimizer update of the detector on ``batch``.

    Args:
        loss_forward: ``(images, gt_bboxes, gt_labels, pad_shapes) -> {'loss_cls': [...],
            'loss_bbox': [...]}`` (a :class:`LossForward`, possibly in ``paddle.DataParallel``).
        optimizer: :class:`~paddle_impl.engine.optimizer.SGD` over the detector.
        schedule: :class:`~paddle_impl.engine.lr_schedule.WarmupMultiStepLR`; its current
            learning rate is used, then it advances one iteration.
        batch: ``images`` ``(N, 3, H, W)`` (cast to the parameters' dtype when it
            differs), per-image ``gt_bboxes`` ``(G_i, 4)`` and ``gt_labels`` ``(G_i,)``,
            ``pad_shapes`` ``[(h, w)]``.
        max_norm: gradient clipping bound (default the configuration's, 35).
        after_backward: called after ``backward`` and before clipping, with the
            gradients in place (to record or reduce them).
        iteration: the 1-based number named in a non-finite error (default
            the schedule's next iteration).
    Returns:
        :class:`StepResult`.
    Raises:
        NonFiniteLossError: a loss term is NaN or infinite (before the update), or
            the gradient norm is (the parameters are then not to be saved).
    """
    lr = schedule.get_lr()
    optimizer.set_lr(lr)
    images = batch["images"]
    if not isinstance(images, paddle.Tensor):
        images = paddle.to_tensor(images)
    dtype = next(iter(optimizer.parameters().values())).dtype
    if images.dtype != dtype:
        images = images.astype(dtype)
    losses = loss_forward(images, batch["gt_bboxes"], batch["gt_labels"], batch["pad_shapes"])
    loss_cls = sum(losses["loss_cls"])
    loss_bbox = sum(losses["loss_bbox"])
    total = loss_cls + loss_bbox
    result = StepResult(lr=float(lr), loss_cls=float(loss_cls), loss_bbox=float(loss_bbox),
                        loss=float(total), loss_cls_levels=[float(v) for v in losses["loss_cls"]],
                        loss_bbox_levels=[float(v) for v in losses["loss_bbox"]], grad_norm=math.nan,
                        losses=dict(losses))
    number = iteration if iteration is not None else schedule.iteration + 1
    if not math.isfinite(result.loss):
        raise NonFiniteLossError(f"iteration {number}: {_non_finite_term(result)}; stopped "
                                 "before the update, the last checkpoint is unchanged")
    total.backward()
    if after_backward is not None:
        after_backward()
    result.grad_norm = float(optimizer.clip_and_step(max_norm))
    if not math.isfinite(result.grad_norm):
        raise NonFiniteLossError(f"iteration {number}: the gradient norm is {result.grad_norm} "
                                 f"(loss {result.loss:.6g}); stopped, the last checkpoint is unchanged")
    optimizer.clear_grad()
    schedule.step()
    return result


def _non_finite_term(result: StepResult) -> str:
    """Which loss term is NaN or infinite, first by level: ``loss_cls of FPN level 0 (P3) is nan``."""
    for term, levels in (("loss_cls", result.loss_cls_levels), ("loss_bbox", result.loss_bbox_levels)):
        for level, value in enumerate(levels):
            if not math.isfinite(value):
                return f"{term} of FPN level {level} (P{level + 3}) is {value}"
    return f"the total loss is {result.loss}"
