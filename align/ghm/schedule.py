"""Learning rate of every training iteration: mmengine's schedulers and ours, as arrays to diff.

`mmengine_lrs` builds mmdet's own ``param_scheduler`` list (read from the GHM
config through ``torch_ref.reference.load_config()``) on a torch SGD built from
the config's ``optim_wrapper``, and drives it as mmengine's runner does in an
``EpochBasedTrainLoop``: ``ParamSchedulerHook.after_train_iter`` after every
iteration, ``after_train_epoch`` after every epoch. It records the lr the
optimizer step of each iteration uses. `paddle_lrs` records the same from
``paddle_impl.engine.lr_schedule.WarmupMultiStepLR``, stepped the same way.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import numpy as np

from align.engine.compare import TensorDiff, diff_arrays

__all__ = ["mmengine_lrs", "paddle_lrs", "schedule_comparison", "BoundaryRow", "LR_TOL"]

# Learning rates are compared to within rounding.
LR_TOL = 1e-12


def mmengine_lrs(iters_per_epoch: int, max_epochs: Optional[int] = None,
                 base_lr: Optional[float] = None) -> np.ndarray:
    """mmengine's learning rate for each iteration of training.

    Args:
        iters_per_epoch: optimizer steps per epoch (the runner's ``len(train_dataloader)``).
        max_epochs: epochs to run; default the config's ``train_cfg.max_epochs``.
        base_lr: the optimizer's lr before scheduling, as ``Runner.scale_lr``
            would leave it; default the config's ``optim_wrapper.optimizer.lr``.

    Returns:
        float64 array of shape (iters_per_epoch * max_epochs,).
    """
    import torch
    from mmengine.hooks import ParamSchedulerHook
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    from torch_ref.reference import load_config

    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be positive, got {iters_per_epoch}")
    cfg = load_config()
    if max_epochs is None:
        max_epochs = cfg.train_cfg.max_epochs
    # The schedulers only read and write the optimizer's lr, so one parameter will do.
    wrapper = build_optim_wrapper(torch.nn.Linear(1, 1), cfg.optim_wrapper)
    if base_lr is not None:
        for group in wrapper.optimizer.param_groups:
            group["lr"] = float(base_lr)

    # Runner._build_param_scheduler: a default ``end`` for schedulers without
    # one, then the registry's build with the epoch length.
    schedulers = []
    for scheduler_cfg in cfg.param_scheduler:
        scheduler_cfg = copy.deepcopy(scheduler_cfg)
        by_epoch = scheduler_cfg.get("by_epoch", True)
        scheduler_cfg.setdefault("end", max_epochs if by_epoch else max_epochs * iters_per_epoch)
        schedulers.append(PARAM_SCHEDULERS.build(
            scheduler_cfg, default_args=dict(optimizer=wrapper, epoch_length=iters_per_epoch)))

    hook = ParamSchedulerHook()
    runner = SimpleNamespace(param_schedulers=schedulers)
    lrs = np.empty(iters_per_epoch * max_epochs, dtype=np.float64)
    it = 0
    for _ in range(max_epochs):
        for batch_idx in range(iters_per_epoch):
            lrs[it] = wrapper.optimizer.param_groups[0]["lr"]
            # OptimWrapper.step as in train_step (clipping, then SGD): with no
            # gradients nothing changes, but mmengine's schedulers count the
            # call to check that the optimizer steps before they do.
            wrapper.step()
            hook.after_train_iter(runner, batch_idx)
            it += 1
        hook.after_train_epoch(runner)
    return lrs


def paddle_lrs(iters_per_epoch: int, max_epochs: Optional[int] = None,
               base_lr: Optional[float] = None) -> np.ndarray:
    """``WarmupMultiStepLR``'s learning rate for each iteration, read through its stateful API.

    Arguments as `mmengine_lrs`; defaults from ``paddle_impl.config`` (base_lr:
    ``scaled_lr(base_batch_size)``, i.e. the reference lr). Returns float64 of
    shape (iters_per_epoch * max_epochs,).
    """
    from paddle_impl.config import get_config
    from paddle_impl.engine.lr_schedule import WarmupMultiStepLR

    cfg = get_config()
    if max_epochs is not None:
        cfg["optimizer"]["max_epochs"] = int(max_epochs)
    scheduler = WarmupMultiStepLR.from_config(
        iters_per_epoch, total_batch_size=cfg["optimizer"]["base_batch_size"], cfg=cfg, base_lr=base_lr)
    lrs = np.empty(scheduler.total_iters, dtype=np.float64)
    for it in range(scheduler.total_iters):
        lrs[it] = scheduler()
        scheduler.step()
    return lrs


class BoundaryRow(NamedTuple):
    """A boundary iteration of the whole learning-rate schedule."""

    boundary: str
    iteration: int
    epoch: int
    mmengine_lr: float
    paddle_lr: float
    abs_diff: float


def schedule_comparison(iters_per_epoch: int, reference: Optional[Callable[[int], np.ndarray]] = None
                        ) -> tuple[TensorDiff, list[BoundaryRow], dict]:
    """Every iteration's learning rate over the config's whole schedule: mmengine's schedulers vs ours.

    ``reference`` gives mmengine's rates (default `mmengine_lrs`; a stage may
    take them from its cache). Returns the ``(iters_per_epoch * max_epochs,)``
    diff row, a table of the schedule's boundary iterations and figures for
    the report's meta.
    """
    from paddle_impl.config import get_config

    o = get_config()["optimizer"]
    ref, ours = (reference or mmengine_lrs)(iters_per_epoch), paddle_lrs(iters_per_epoch)
    row = diff_arrays(f"lr_schedule.{o['max_epochs']}_epochs_x_{iters_per_epoch}_iters", ref, ours,
                      rel_tol=LR_TOL, mean_tol=LR_TOL, ref_label="mmengine")
    boundaries = {"first iteration": 0, "last warm-up iteration": o["warmup_iters"] - 1,
                  "first after warm-up": o["warmup_iters"]}
    for m in o["milestones"]:
        boundaries[f"last of epoch {m}"] = m * iters_per_epoch - 1
        boundaries[f"first of epoch {m + 1}"] = m * iters_per_epoch
    boundaries["last iteration"] = ref.size - 1
    table = [BoundaryRow(label, it, it // iters_per_epoch + 1, float(ref[it]), float(ours[it]),
                         float(abs(ours[it] - ref[it])))
             for label, it in boundaries.items() if 0 <= it < ref.size]
    differing = np.flatnonzero(ref != ours)
    meta = {"iters_per_epoch": iters_per_epoch, "iterations": int(ref.size),
            "max_abs_diff": row.max_abs, "iterations_not_bitwise_equal": int(differing.size),
            "first_iteration_not_bitwise_equal": int(differing[0]) if differing.size else None}
    return row, table, meta
