"""What the GHM losses accept, and the dtype rules of torch they follow to match mmdet.

mmdet's GHM-C casts its targets and label weights with ``.float()``; its GHM-R
subtracts the targets from the predictions with torch's type promotion. These
checks refuse, with a ValueError naming the shapes or dtypes, the inputs on
which mmdet fails later (or silently broadcasts), before any work.
"""
from __future__ import annotations

import numpy as np
import paddle

__all__ = ["check_prediction_dtype", "as_float32", "ghmc_index_targets", "difference_dtype"]


def check_prediction_dtype(loss_name: str, pred: paddle.Tensor) -> None:
    if pred.dtype not in (paddle.float32, paddle.float64):
        raise ValueError(f"{loss_name}: predictions must be float32 or float64, got {pred.dtype}")


def as_float32(tensor: paddle.Tensor) -> paddle.Tensor:
    """``tensor.float()`` of torch: the tensor itself when it is float32 already."""
    return tensor if tensor.dtype == paddle.float32 else tensor.astype("float32")


def ghmc_index_targets(pred, target, label_weight) -> bool:
    """Whether the targets are class indices; a ValueError naming the shapes (or the
    dtype of index targets) when the inputs do not fit together (mmdet would fail
    later, or silently broadcast)."""
    pred_shape, target_shape = list(pred.shape), list(target.shape)
    weight_shape = list(label_weight.shape)
    if len(target_shape) != len(pred_shape):
        if len(pred_shape) != 2 or len(target_shape) != 1 or target_shape[0] != pred_shape[0]:
            raise ValueError(f"GHMC: class-index targets need pred (N, C) and target (N,), "
                             f"got pred {pred_shape} and target {target_shape}")
        # torch indexes with int32 and int64 only; mmdet raises an IndexError for others.
        if target.dtype not in (paddle.int32, paddle.int64):
            raise ValueError(f"GHMC: class-index targets must be int32 or int64, got {target.dtype} "
                             f"targets for {pred.dtype} pred")
        if int(np.prod(weight_shape)) != pred_shape[0]:
            raise ValueError(f"GHMC: with class-index targets label_weight needs N = {pred_shape[0]} "
                             f"values, got label_weight {weight_shape} for pred {pred_shape}")
        return True
    if target_shape != pred_shape:
        raise ValueError(f"GHMC: target {target_shape} must have the shape of pred {pred_shape}")
    try:
        broadcast = list(np.broadcast_shapes(tuple(weight_shape), tuple(pred_shape)))
    except ValueError:
        broadcast = None
    if broadcast != pred_shape:
        raise ValueError(f"GHMC: label_weight {weight_shape} does not broadcast to pred {pred_shape}")
    return False


def difference_dtype(pred, target):
    """The dtype torch gives ``pred - target`` for a float32 or float64 ``pred``.

    Integer targets take the prediction's dtype and floating ones the wider of
    the two, except that a 0-dim tensor does not widen one with dimensions. A
    bool target is a ValueError naming the dtypes (torch refuses to subtract it).
    """
    if target.dtype == paddle.bool:
        raise ValueError(f"GHMR: cannot subtract {target.dtype} targets from {pred.dtype} pred")
    if not paddle.is_floating_point(target):
        return pred.dtype
    if (pred.ndim == 0) != (target.ndim == 0):
        return target.dtype if pred.ndim == 0 else pred.dtype
    return paddle.float64 if paddle.float64 in (pred.dtype, target.dtype) else pred.dtype
