"""Each framework's own optimizer and gradient clipping, set up so that both make the same update.

| ``--optimizer`` | torch | Paddle | state compared |
|---|---|---|---|
| ``sgd`` | ``torch.optim.SGD`` | ``paddle.optimizer.SGD`` | none |
| ``momentum`` | ``torch.optim.SGD(momentum=0.9)`` | ``paddle.optimizer.Momentum(momentum=0.9)`` | ``momentum`` |
| ``adam`` | ``torch.optim.Adam`` | ``paddle.optimizer.Adam`` | ``moment1``, ``moment2`` |
| ``adamw`` | ``torch.optim.AdamW`` | ``paddle.optimizer.AdamW`` | ``moment1``, ``moment2`` |

Where the two differ in form, the update is still the same:

- momentum: torch keeps ``b = mu * b + (g + wd * p)`` (dampening 0, not Nesterov) and steps
  ``p -= lr * b``; Paddle's Momentum keeps ``v = mu * v + (g + wd * p)`` and steps ``p -= lr * v``
  with a float ``weight_decay`` (coupled L2, fused into its update): the same buffer. Paddle
  keeps ``mu`` and that coefficient as float32 attributes, so both sides use their float32 values.
- weight decay: coupled L2 (added to the gradient after clipping) for sgd, momentum and adam
  in both frameworks given a float; decoupled for adamw in both (``p *= 1 - lr * wd`` before
  the Adam step).
- Adam's epsilon: torch divides ``m / (1 - b1^t)`` by ``sqrt(v / (1 - b2^t)) + eps``, Paddle
  ``m`` by ``sqrt(v) + eps * sqrt(1 - b2^t)`` with the learning rate scaled by
  ``sqrt(1 - b2^t) / (1 - b1^t)``: algebraically the same step, so they agree to rounding.
- clipping: torch's ``clip_grad_norm_`` scales by ``C / (norm + 1e-6)`` when that is below 1,
  Paddle's ``ClipGradByGlobalNorm`` by ``C' / max(norm, C')`` with no 1e-6; each step the
  Paddle side sets ``C' = C * norm / (norm + 1e-6)``, which gives torch's factor and clips at
  the same norms (`PaddleClip`).

Paddle keeps the learning rate as a tensor of the parameters' dtype, so a float64 run steps
with the float64 learning rate, as torch does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

# ``--optimizer`` -> the state groups it keeps, each as (torch's key, Paddle's accumulator).
STATE = {"sgd": {}, "momentum": {"momentum": ("momentum_buffer", "velocity")},
         "adam": {"moment1": ("exp_avg", "moment1"), "moment2": ("exp_avg_sq", "moment2")},
         "adamw": {"moment1": ("exp_avg", "moment1"), "moment2": ("exp_avg_sq", "moment2")}}
STATE_LABELS = {"momentum": "momentum buffers", "moment1": "Adam first moments", "moment2": "Adam second moments"}
# torch's clip_grad_norm_ adds this to the norm it divides by.
TORCH_CLIP_EPS = 1e-6


@dataclass(frozen=True)
class OptimizerSettings:
    """One optimizer configuration for both frameworks (see the module docstring)."""

    kind: str  # "sgd", "momentum", "adam" or "adamw"
    lr: float
    weight_decay: float
    clip: Optional[float]  # the global L2 norm gradients are clipped to; None: no clipping
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.kind not in STATE:
            raise ValueError(f"--optimizer {self.kind!r}: one of {', '.join(STATE)}")
        if self.kind == "momentum":
            # Paddle's Momentum holds mu and its L2 coefficient as float32 attributes (0.9 becomes
            # 0.89999998): both sides take those values, so a float64 run compares the same update.
            object.__setattr__(self, "momentum", float(np.float32(self.momentum)))
            object.__setattr__(self, "weight_decay", float(np.float32(self.weight_decay)))

    def state_groups(self) -> dict[str, tuple[str, str]]:
        return STATE[self.kind]


def torch_optimizer(params: Iterable, s: OptimizerSettings):
    """torch's own optimizer of ``s.kind`` over ``params``."""
    import torch

    params = list(params)
    if s.kind in ("sgd", "momentum"):
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum if s.kind == "momentum" else 0.0,
                               weight_decay=s.weight_decay)
    cls = torch.optim.Adam if s.kind == "adam" else torch.optim.AdamW
    return cls(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)


class PaddleClip:
    """Paddle's ``ClipGradByGlobalNorm`` with its bound set per step to clip as torch does
    (``set_norm`` with the step's global norm before the update; see the module docstring)."""

    def __init__(self, max_norm: float):
        import paddle

        self.max_norm = max_norm
        self.clip = paddle.nn.ClipGradByGlobalNorm(clip_norm=max_norm)

    def set_norm(self, norm: float) -> None:
        self.clip.clip_norm = float(self.max_norm * norm / (norm + TORCH_CLIP_EPS))


def paddle_optimizer(parameters: list, s: OptimizerSettings, clip: Optional[PaddleClip]):
    """Paddle's own optimizer of ``s.kind`` over ``parameters`` (a float weight decay is
    Paddle's coupled L2 for sgd, momentum and adam, AdamW's own coefficient for adamw)."""
    import paddle

    grad_clip = None if clip is None else clip.clip
    common = dict(learning_rate=s.lr, parameters=parameters, weight_decay=float(s.weight_decay), grad_clip=grad_clip)
    if s.kind == "sgd":
        return paddle.optimizer.SGD(**common)
    if s.kind == "momentum":
        return paddle.optimizer.Momentum(momentum=s.momentum, use_nesterov=False, **common)
    cls = paddle.optimizer.Adam if s.kind == "adam" else paddle.optimizer.AdamW
    return cls(beta1=s.betas[0], beta2=s.betas[1], epsilon=s.eps, **common)


def global_norm(tensors: Iterable[Any]) -> float:
    """The L2 norm of all ``tensors`` together (Paddle gradients), summed in float64: Paddle's
    float32 norm of a few million elements is off by about 1e-5, torch's by about 1e-7."""
    import paddle

    norms = [paddle.linalg.norm(t.astype("float64").flatten()) for t in tensors]
    return float(paddle.linalg.norm(paddle.stack(norms))) if norms else 0.0


def paddle_state(optimizer, named_parameters: dict, s: OptimizerSettings) -> dict[str, dict[str, Any]]:
    """Paddle's optimizer state by group and parameter name (its accumulators are named
    ``<parameter's internal name>_<accumulator>_<k>``)."""
    saved = optimizer.state_dict()
    out: dict[str, dict[str, Any]] = {}
    for group, (_, accumulator) in s.state_groups().items():
        out[group] = {}
        for name, param in named_parameters.items():
            prefix = f"{param.name}_{accumulator}_"
            key = next((k for k in saved if k.startswith(prefix)), None)
            if key is not None:
                out[group][name] = saved[key]
    return out
