"""The learning-rate schedule of mmdet's ``schedule_1x``: linear warm-up, then steps at epochs.

mmdet 3.3.0 configures::

    param_scheduler = [
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
        dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)]
    train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12)

and mmengine's runner drives it like this (no ``convert_to_iter_based`` key,
so ``MultiStepLR`` stays epoch-based):

* both schedulers act on the same optimizer ``lr``, each multiplying the
  CURRENT value (mmengine's "chainable form"), so their effects compound;
* each scheduler steps once when it is built (``LinearLR`` first, it is first
  in the list): ``LinearLR`` multiplies by ``start_factor``; ``MultiStepLR``
  changes nothing unless 0 is a milestone;
* ``ParamSchedulerHook.after_train_iter`` steps ``LinearLR`` after every
  iteration; after the k-th step (k = 1 .. warmup_iters - 1) it multiplies by
  ``1 + (1 - s) / ((warmup_iters - 1) * s + (k - 1) * (1 - s))`` with
  ``s = start_factor``, and from step ``warmup_iters`` on it does nothing;
* ``ParamSchedulerHook.after_train_epoch`` steps ``MultiStepLR`` after every
  epoch; after epoch ``e`` (0-based) it multiplies by ``gamma ** c`` where
  ``c`` counts ``e + 1`` in the milestones, up to its ``end`` (max_epochs).

So iteration 0 uses ``base_lr * start_factor``, the warm-up reaches
``base_lr`` (up to rounding) at iteration ``warmup_iters - 1``, and the
epochs from 8 and from 11 (0-based) use 0.1x and 0.01x. A warm-up longer than
the first milestone keeps both effects: the decays apply to the warming-up lr.

The products are rounded at every step, so the closed form ``base_lr * factor``
differs from mmengine in the last bits. `WarmupMultiStepLR` replays mmengine's
Python float arithmetic in the same order and is identical to it, iteration by
iteration; ``align/ghm/schedule.py`` diffs the two.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from paddle.optimizer.lr import LRScheduler

from paddle_impl.config import get_config
from paddle_impl.engine.optimizer import scaled_lr

__all__ = ["WarmupMultiStepLR"]


class WarmupMultiStepLR(LRScheduler):
    """mmengine's ``LinearLR`` (per iteration) + ``MultiStepLR`` (per epoch), indexed by iteration.

    A Paddle ``LRScheduler``: ``last_epoch`` is the global iteration index
    (0-based) whose learning rate ``last_lr`` (and ``scheduler()``) holds; it is
    0 after construction and `step` advances it by one, to be called after
    every iteration as mmengine's hook does. ``lr_at`` reads any iteration
    without changing the state. Iterations past the end of training keep the
    last epoch's value, as mmengine's schedulers stop changing it.

    Args:
        base_lr: the optimizer's lr before scheduling (after any batch-size scaling).
        iters_per_epoch: optimizer steps per epoch (``len(train_dataloader)``).
        warmup_start_factor: ``LinearLR.start_factor``, in (0, 1].
        warmup_iters: ``LinearLR.end`` with ``begin=0``, in iterations, >= 1.
        milestones: ``MultiStepLR.milestones``, in epochs (repeats compound, as in mmengine).
        gamma: ``MultiStepLR.gamma``.
        max_epochs: ``MultiStepLR.end`` and the length of training, in epochs.
    """

    def __init__(self, base_lr: float, iters_per_epoch: int, warmup_start_factor: float,
                 warmup_iters: int, milestones: Sequence[int], gamma: float, max_epochs: int):
        for name, value in (("iters_per_epoch", iters_per_epoch), ("warmup_iters", warmup_iters),
                            ("max_epochs", max_epochs)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 < warmup_start_factor <= 1.0:
            # mmengine accepts 0 but then divides by zero at its second step.
            raise ValueError(f"warmup_start_factor must be in (0, 1], got {warmup_start_factor}")
        milestones = [int(m) for m in milestones]
        if milestones != sorted(milestones) or any(m < 0 for m in milestones):
            raise ValueError(f"milestones must be non-negative epochs in increasing order, got {milestones}")
        self.iters_per_epoch = int(iters_per_epoch)
        self.warmup_start_factor = float(warmup_start_factor)
        self.warmup_iters = int(warmup_iters)
        self.milestones = milestones
        self.gamma = float(gamma)
        self.max_epochs = int(max_epochs)
        self.total_iters = self.iters_per_epoch * self.max_epochs
        self._table = self._replay_mmengine(float(base_lr))
        # Paddle's LRScheduler stores base_lr and steps once to iteration 0.
        super().__init__(learning_rate=base_lr)

    @classmethod
    def from_config(cls, iters_per_epoch: int, total_batch_size: int = 16,
                    cfg: Optional[Mapping[str, Any]] = None,
                    base_lr: Optional[float] = None) -> "WarmupMultiStepLR":
        """The reference schedule; ``base_lr`` defaults to `scaled_lr` (total_batch_size)."""
        opt = (cfg if cfg is not None else get_config())["optimizer"]
        if base_lr is None:
            base_lr = scaled_lr(total_batch_size, cfg)
        return cls(base_lr=base_lr, iters_per_epoch=iters_per_epoch,
                   warmup_start_factor=opt["warmup_start_factor"], warmup_iters=opt["warmup_iters"],
                   milestones=opt["milestones"], gamma=opt["gamma"], max_epochs=opt["max_epochs"])

    def _replay_mmengine(self, base_lr: float) -> np.ndarray:
        """The lr of every iteration, from mmengine's recurrences in its operation order.

        Returns a float64 array of shape (iters_per_epoch * max_epochs,).
        """
        start = self.warmup_start_factor
        end_factor = 1.0  # LinearLR's default, which mmdet keeps
        linear_total = self.warmup_iters - 1  # LinearLR.total_iters = end - begin - 1
        decays = Counter(self.milestones)

        # Construction: LinearLR's first step (its chainable branch for step 0),
        # then MultiStepLR's (step 0 is a milestone only if listed).
        lr = base_lr * start
        if 0 in decays:
            lr = lr * self.gamma ** decays[0]

        table = np.empty(self.total_iters, dtype=np.float64)
        it = 0
        for epoch in range(self.max_epochs):
            for _ in range(self.iters_per_epoch):
                table[it] = lr
                it += 1
                # LinearLR after iteration it-1: its step index is it, active while it < end.
                if it < self.warmup_iters:
                    lr = lr * (1. + (end_factor - start) /
                               (linear_total * start + (it - 1) * (end_factor - start)))
            # MultiStepLR after the epoch: step index epoch + 1, active while < max_epochs.
            step = epoch + 1
            if step < self.max_epochs and step in decays:
                lr = lr * self.gamma ** decays[step]
        return table

    def lr_at(self, iteration: int) -> float:
        """The learning rate used by global iteration ``iteration`` (0-based)."""
        if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)) or iteration < 0:
            raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
        return float(self._table[min(int(iteration), self.total_iters - 1)])

    def lrs(self) -> np.ndarray:
        """A copy of every iteration's learning rate, float64 of shape (iters_per_epoch * max_epochs,)."""
        return self._table.copy()

    def get_lr(self) -> float:
        """Paddle's hook: the learning rate of iteration ``last_epoch``."""
        return self.lr_at(self.last_epoch)

    @property
    def iteration(self) -> int:
        """The global iteration whose learning rate ``last_lr`` holds."""
        return self.last_epoch

    def _schedule_args(self) -> dict[str, Any]:
        return dict(base_lr=self.base_lr, iters_per_epoch=self.iters_per_epoch,
                    warmup_start_factor=self.warmup_start_factor, warmup_iters=self.warmup_iters,
                    milestones=list(self.milestones), gamma=self.gamma, max_epochs=self.max_epochs)

    def state_dict(self) -> dict[str, Any]:
        """``{'last_epoch': iteration, 'last_lr': float, 'schedule': constructor arguments}``."""
        return {"last_epoch": int(self.last_epoch), "last_lr": float(self.last_lr),
                "schedule": self._schedule_args()}

    def set_state_dict(self, state_dict: Mapping[str, Any], require_same_schedule: bool = True) -> None:
        """Resume at the saved iteration; the saved schedule must equal this one, unless
        ``require_same_schedule`` is False: then the saved iteration continues under this
        schedule's arguments (a resume told to change the training options).

        Raises KeyError for a missing entry and ValueError when the schedule
        arguments differ (resuming into a different schedule would be silent drift).
        """
        missing = [k for k in ("last_epoch", "schedule") if k not in state_dict]
        if missing:
            raise KeyError(f"lr schedule state_dict lacks {missing}")
        saved, mine = dict(state_dict["schedule"]), self._schedule_args()
        differ = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if differ and require_same_schedule:
            raise ValueError(f"lr schedule state_dict is for a different schedule "
                             f"(argument: (saved, this)): {differ}")
        last = state_dict["last_epoch"]
        if isinstance(last, bool) or not isinstance(last, (int, np.integer)) or last < 0:
            raise ValueError(f"last_epoch must be a non-negative int, got {last!r}")
        self.last_epoch = int(last)
        self.last_lr = self.get_lr()
