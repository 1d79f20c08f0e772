"""The training step's optimizer: torch's SGD rule and gradient clipping, in Paddle.

mmdet 3.3.0 trains GHM RetinaNet with mmengine's ``OptimWrapper`` around
``torch.optim.SGD(lr, momentum=0.9, weight_decay=1e-4)`` (dampening 0, not
Nesterov) and ``clip_grad=dict(max_norm=35, norm_type=2)``. One update is:

1. clip: ``torch.nn.utils.clip_grad_norm_`` over the parameters that have a
   gradient (`clip_grad_norm_` here);
2. step, per parameter with a gradient (torch skips ``grad is None``)::

       d   = grad + weight_decay * param        # coupled L2 decay, after clipping
       buf = d                                  # first step of this parameter
       buf = momentum * buf + d                 # later steps
       param = param - lr * buf

3. ``zero_grad``, which in torch 2.x sets the gradients to ``None``.

Rounding. torch's vectorised CPU kernels (AVX2/AVX512, measured with torch
2.13) evaluate ``grad + wd * param`` and ``param + (-lr) * buf`` as fused
multiply-adds: one rounding to float32 instead of two. `SGD` reproduces
that by evaluating those two expressions in float64, where the product of two
float32 numbers is exact, and rounding once to float32; ``momentum * buf`` and
the following ``+ d`` are two float32 roundings, as in torch. The result equals
torch's bit for bit except when the float64 sum itself had to round onto a
float32 tie (double rounding: rare, and then one unit in the last place).
Float64 parameters (for alignment runs in double precision) are updated in
float64 with the unrounded Python scalars, as torch updates double tensors;
there a fused multiply-add and the two roundings used here differ by at most
one float64 unit in the last place.
``paddle.optimizer.Momentum`` with a float ``weight_decay`` applies the same
rule (decay added before the velocity update, first velocity ``0 * mu + d =
d``) but rounds every operation separately: it drifts from torch by about one
unit in the last place per step, and keys its state by internal tensor names.

Every value read from the configuration comes from
``paddle_impl.config.get_config()['optimizer']``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import paddle

from paddle_impl.config import get_config

__all__ = ["scaled_lr", "clip_grad_norm_", "SGD"]

# torch adds this to the total norm before dividing max_norm by it.
_CLIP_EPS = 1e-6

# Parameter dtypes the update rule is written for.
_FLOAT_DTYPES = (paddle.float32, paddle.float64)


def _optimizer_cfg(cfg: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The ``optimizer`` section of ``cfg`` (the whole configuration), default the reference's."""
    return (cfg if cfg is not None else get_config())["optimizer"]


def _float32(value: float) -> float:
    """``value`` rounded to float32, as torch rounds a Python scalar applied to a float32 tensor."""
    return float(np.float32(value))


def scaled_lr(total_batch_size: int, cfg: Optional[Mapping[str, Any]] = None) -> float:
    """Learning rate for ``total_batch_size`` images per step, by the linear scaling rule.

    The reference lr (0.01) is for ``base_batch_size`` (16) images per step
    (8 GPUs x 2). The result is ``lr * (total_batch_size / base_batch_size)``
    in that order of operations, as mmengine's ``Runner.scale_lr`` computes it
    when ``auto_scale_lr`` is enabled. Pass an explicit lr to `SGD` or
    `WarmupMultiStepLR` instead to override the rule.

    Args:
        total_batch_size: images per optimizer step, summed over all devices.
        cfg: the whole configuration (``get_config()``); default the reference's.
    """
    if isinstance(total_batch_size, bool) or not isinstance(total_batch_size, (int, np.integer)):
        raise TypeError(f"total_batch_size must be an int, got {type(total_batch_size).__name__}")
    if total_batch_size <= 0:
        raise ValueError(f"total_batch_size must be positive, got {total_batch_size}")
    opt = _optimizer_cfg(cfg)
    ratio = float(total_batch_size) / float(opt["base_batch_size"])
    return opt["lr"] * ratio


def _numpy_dtype(tensor: paddle.Tensor) -> type:
    """The numpy dtype of a float32 or float64 tensor."""
    return np.float64 if tensor.dtype == paddle.float64 else np.float32


def _trainable_grads(parameters) -> list[paddle.Tensor]:
    """Gradients of the parameters that train and have one, in order; all
    float32 or all float64."""
    if isinstance(parameters, paddle.Tensor):
        parameters = [parameters]
    grads = []
    for param in parameters:
        if param.stop_gradient:
            continue
        grad = param.grad
        if grad is None:
            continue
        if grad.dtype not in _FLOAT_DTYPES or (grads and grad.dtype != grads[0].dtype):
            raise TypeError(f"clip_grad_norm_ expects float32 (or all float64) gradients, got "
                            f"{grad.dtype} for a parameter of shape {list(param.shape)}")
        grads.append(grad)
    return grads


def clip_grad_norm_(parameters: Union[paddle.Tensor, Iterable[paddle.Tensor]],
                    max_norm: float, norm_type: float = 2.0) -> paddle.Tensor:
    """Scale the gradients in place so that their total norm is at most ``max_norm``.

    The semantics of ``torch.nn.utils.clip_grad_norm_`` (torch 2.x):

    * the total norm is the ``norm_type``-norm of the per-parameter
      ``norm_type``-norms (as if all gradients were one vector), a scalar in
      the gradients' dtype (float32, or float64 when every gradient is);
      parameters with ``stop_gradient=True`` or no gradient are left out;
    * every gradient is multiplied by ``min(max_norm / (total_norm + 1e-6), 1)``;
      like torch, the quotient is computed as ``reciprocal(total_norm + 1e-6)
      * max_norm`` in the gradients' dtype, and the clamp is a tensor op, so
      nothing is read back to the host. A coefficient of exactly 1 leaves the
      gradients unchanged;
    * a non-finite total norm is not an error: the coefficient becomes 0 (inf)
      or NaN, as in torch.

    Each norm is accumulated in float64 and rounded to the gradients' dtype,
    which for float32 gives the correctly rounded norm. torch's float32 CPU
    reduction is not exact: it is within about 1e-7 relative of this for
    thousands of elements and drifts to about 4e-5 for millions; Paddle's own
    float32 ``vector_norm`` drifts about twenty times more.

    Args:
        parameters: a parameter or an iterable of parameters (float32 or
            float64 gradients, one dtype for all).
        max_norm: the largest total norm allowed.
        norm_type: the p of the p-norm, a positive number or ``inf``.

    Returns:
        The total norm before clipping: a tensor of shape ``[]`` in the
        gradients' dtype (float32 0 when no parameter has a gradient).
    """
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type}")
    max_norm = float(max_norm)
    grads = _trainable_grads(parameters)
    if not grads:
        return paddle.zeros([], dtype="float32")
    dtype = grads[0].dtype
    with paddle.no_grad():
        norms = [paddle.linalg.vector_norm(g.astype("float64"), p=norm_type).astype(dtype)
                 for g in grads]
        total_norm = paddle.linalg.vector_norm(
            paddle.stack(norms).astype("float64"), p=norm_type).astype(dtype)
        # Constants in the gradients' dtype, as torch applies Python scalars.
        eps = paddle.full([], _CLIP_EPS, dtype=dtype)
        limit = paddle.full([], max_norm, dtype=dtype)
        coef = paddle.reciprocal(total_norm + eps) * limit
        coef = paddle.clip(coef, max=1.0)
        for g in grads:
            g.multiply_(coef)
    return total_norm


class SGD:
    """torch's ``SGD(lr, momentum, weight_decay)`` (dampening 0, not Nesterov) on Paddle parameters.

    The update rule and its rounding are described in this module's docstring.
    A parameter is skipped, with no decay and no momentum update, when it has
    ``stop_gradient=True`` or its gradient is ``None`` (`clear_grad` sets
    gradients to ``None``, as ``torch.optim.Optimizer.zero_grad`` does, so a
    parameter the loss did not reach is skipped like in torch). A gradient that
    is exactly zero is a gradient: decay and momentum still apply.

    Momentum buffers are tensors of the parameter's shape and dtype, keyed by the
    parameter's name (``Layer.named_parameters()``), created at a parameter's
    first update.

    Args:
        parameters: a ``paddle.nn.Layer`` or an iterable of ``(name, parameter)``
            pairs; float32 parameters (float64 ones for double-precision runs).
        lr: initial learning rate; default the configuration's lr (for
            ``base_batch_size`` images, see `scaled_lr`). Change it with `set_lr`.
        momentum: default the configuration's (0.9); 0 means plain SGD, no buffers.
        weight_decay: coupled L2 coefficient; default the configuration's (1e-4).
        cfg: the whole configuration (``get_config()``); default the reference's.
    """

    def __init__(self, parameters, lr: Optional[float] = None, momentum: Optional[float] = None,
                 weight_decay: Optional[float] = None, cfg: Optional[Mapping[str, Any]] = None):
        opt = _optimizer_cfg(cfg)
        self._params: "OrderedDict[str, paddle.Tensor]" = self._named(parameters)
        self.momentum = float(opt["momentum"] if momentum is None else momentum)
        self.weight_decay = float(opt["weight_decay"] if weight_decay is None else weight_decay)
        if self.momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self._clip_max_norm = float(opt["clip_grad_max_norm"])
        self.set_lr(opt["lr"] if lr is None else lr)
        self._buffers: "OrderedDict[str, paddle.Tensor]" = OrderedDict()

    @staticmethod
    def _named(parameters) -> "OrderedDict[str, paddle.Tensor]":
        if isinstance(parameters, paddle.nn.Layer):
            pairs = list(parameters.named_parameters())
        else:
            pairs = list(parameters)
        named: "OrderedDict[str, paddle.Tensor]" = OrderedDict()
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError("SGD needs named parameters: pass a paddle.nn.Layer or "
                                f"(name, parameter) pairs, got an item of type {type(item).__name__}")
            name, param = item
            if name in named:
                raise ValueError(f"parameter name {name!r} appears twice")
            if param.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"SGD updates float32 or float64 parameters; {name!r} is {param.dtype}")
            named[name] = param
        if not named:
            raise ValueError("SGD got no parameters")
        return named

    # Learning rate -------------------------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        """Use ``lr`` from the next `step` on (call it every iteration with the schedule's value)."""
        lr = float(lr)
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr}")
        self.lr = lr

    def get_lr(self) -> float:
        """The learning rate the next `step` uses."""
        return self.lr

    # The update ----------------------------------------------------------------------------

    def parameters(self) -> "OrderedDict[str, paddle.Tensor]":
        """All parameters given to the optimizer, by name (frozen ones included)."""
        return OrderedDict(self._params)

    def step(self) -> None:
        """Update every parameter that trains and has a gradient, in place (no clipping)."""
        scalars = {paddle.float32: (_float32(self.weight_decay), _float32(-self.lr)),
                   paddle.float64: (self.weight_decay, -self.lr)}
        with paddle.no_grad():
            for name, param in self._params.items():
                if param.stop_gradient:
                    continue
                grad = param.grad
                if grad is None:
                    continue
                dtype = param.dtype
                wd, neg_lr = scalars[dtype]
                param64 = param.astype("float64")
                # grad + wd * param with a single rounding (see the module docstring).
                d = grad.astype("float64")
                if self.weight_decay != 0:
                    d = d + param64 * wd
                d = d.astype(dtype)
                if self.momentum != 0:
                    buf = self._buffers.get(name)
                    if buf is None:
                        # A float64 gradient without decay reaches here as the
                        # gradient tensor itself (a cast to the same dtype
                        # returns its input): the buffer must own its memory.
                        buf = d.clone() if d is grad else d
                        self._buffers[name] = buf
                    else:
                        buf.scale_(self.momentum)
                        buf.add_(d)
                    d = buf
                # param + (-lr) * buf with a single rounding.
                updated = (param64 + d.astype("float64") * neg_lr).astype(dtype)
                paddle.assign(updated, output=param)

    def clip_and_step(self, max_norm: Optional[float] = None, norm_type: float = 2.0) -> paddle.Tensor:
        """One mmengine ``OptimWrapper.step``: clip the gradients, then `step`.

        Clips the gradients of this optimizer's parameters that train and have
        one (mmengine's selection) with `clip_grad_norm_`.

        Args:
            max_norm: default the configuration's ``clip_grad_max_norm`` (35).
            norm_type: the p of the p-norm (2).

        Returns:
            The total gradient norm before clipping, a tensor of shape ``[]``
            (float32, or float64 for float64 parameters).
        """
        if max_norm is None:
            max_norm = self._clip_max_norm
        total_norm = clip_grad_norm_(self._params.values(), max_norm, norm_type)
        self.step()
        return total_norm

    def clear_grad(self) -> None:
        """Set every parameter's gradient to ``None`` (torch's ``zero_grad(set_to_none=True)``)."""
        for param in self._params.values():
            # Positional on purpose: Paddle 3.3.1 ignores ``set_to_zero=False``
            # given as a keyword and zero-fills the gradient instead.
            param.clear_gradient(False)

    # State ---------------------------------------------------------------------------------

    def momentum_buffers(self) -> "OrderedDict[str, paddle.Tensor]":
        """The live momentum buffers by parameter name (only parameters updated at least once)."""
        return OrderedDict(self._buffers)

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters and copies of the momentum buffers, for checkpoints.

        ``{'lr': float, 'momentum': float, 'weight_decay': float,
        'momentum_buffers': {name: Tensor of the parameter's shape and dtype}}``.
        """
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "momentum_buffers": OrderedDict((name, buf.clone()) for name, buf in self._buffers.items()),
        }

    def set_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a `state_dict`: hyper-parameters as saved (like torch) and the buffers.

        Raises KeyError for missing entries or buffers of unknown parameters and
        ValueError for buffers whose shape differs from their parameter's.
        """
        missing = [k for k in ("lr", "momentum", "weight_decay", "momentum_buffers") if k not in state_dict]
        if missing:
            raise KeyError(f"optimizer state_dict lacks {missing}")
        buffers = state_dict["momentum_buffers"]
        unknown = sorted(set(buffers) - set(self._params))
        if unknown:
            raise KeyError(f"momentum buffers for parameters this optimizer does not have: {unknown}")
        restored: "OrderedDict[str, paddle.Tensor]" = OrderedDict()
        for name, value in buffers.items():
            param = self._params[name]
            tensor = paddle.to_tensor(np.asarray(value.numpy() if isinstance(value, paddle.Tensor) else value,
                                                 dtype=_numpy_dtype(param)), place=param.place)
            if list(tensor.shape) != list(param.shape):
                raise ValueError(f"momentum buffer {name!r} has shape {list(tensor.shape)}, "
                                 f"the parameter has {list(param.shape)}")
            restored[name] = tensor
        momentum = float(state_dict["momentum"])
        if momentum == 0 and restored:
            raise ValueError("state_dict has momentum 0 but carries momentum buffers")
        self.momentum = momentum
        self.weight_decay = float(state_dict["weight_decay"])
        self.set_lr(state_dict["lr"])
        self._buffers = restored
