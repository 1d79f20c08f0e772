"""mmdet / torchvision state dicts -> Paddle state dicts.

The Paddle model mirrors mmdet's module names, so the mapping is the identity
except for the renames in ``RENAMES``; ``DROPPED`` lists what has no Paddle
counterpart. Conversion is strict: every Paddle parameter and buffer is filled
exactly once from a source key of the same shape, every source key is used or
explicitly dropped, and any mismatch stops with the offending keys named.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from common.atomic_write import atomic_write

# Paddle state-dict suffix -> PyTorch suffix (BatchNorm running statistics).
RENAMES = {
    "._mean": ".running_mean",
    "._variance": ".running_var",
}
# PyTorch suffixes with no Paddle counterpart, dropped on purpose.
DROPPED = (".num_batches_tracked",)
# GHM loss state: mmdet 3.x checkpoints hold the bin edges and momentum
# buffers, mmdet 2.x checkpoints (the model zoo's) do not. When absent, the
# Paddle model keeps its own values (the same edges, a zero momentum buffer).
OPTIONAL_SUFFIXES = (".edges", ".acc_sum")
OPTIONAL_PREFIXES = ("bbox_head.loss_cls.", "bbox_head.loss_bbox.")
# torchvision's ImageNet classifier, which the detector does not use.
TORCHVISION_CLASSIFIER = ("fc.weight", "fc.bias")


class ConversionError(ValueError):
    """A checkpoint does not fit the Paddle model; the message names the keys."""


def torch_key(paddle_key: str) -> str:
    """The PyTorch state-dict key a Paddle key is filled from."""
    for paddle_suffix, torch_suffix in RENAMES.items():
        if paddle_key.endswith(paddle_suffix):
            return paddle_key[: -len(paddle_suffix)] + torch_suffix
    return paddle_key


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def convert_state_dict(source: Mapping[str, object], target_shapes: Mapping[str, tuple],
                       *, source_name: str = "checkpoint",
                       ignore: Callable[[str], bool] = lambda key: False,
                       defaults: Mapping[str, np.ndarray] | None = None
                       ) -> "OrderedDict[str, np.ndarray]":
    """Fill every key of ``target_shapes`` (Paddle key -> shape) from ``source``.

    Source keys for which ``ignore`` is true, and those ending in ``DROPPED``,
    may be left unused; Paddle keys in ``defaults`` take that value when the
    source lacks them. Raises ``ConversionError`` listing every missing,
    unexpected and mis-shaped key at once.
    """
    defaults = defaults or {}
    matched: set[str] = set()
    missing, misshaped = [], []
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for paddle_key, shape in target_shapes.items():
        key = torch_key(paddle_key)
        if key not in source:
            if paddle_key in defaults:
                out[paddle_key] = np.asarray(defaults[paddle_key])
            else:
                missing.append(key)
            continue
        matched.add(key)
        value = _to_numpy(source[key])
        if tuple(value.shape) != tuple(shape):
            misshaped.append(f"{key}: {tuple(value.shape)} in {source_name}, "
                             f"{tuple(shape)} in Paddle ({paddle_key})")
            continue
        out[paddle_key] = value.astype(np.float32) if value.dtype != np.float32 else value
    unexpected = [k for k in source
                  if k not in matched and not k.endswith(DROPPED) and not ignore(k)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {missing}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {unexpected}")
    if misshaped:
        problems.append(f"{len(misshaped)} shape mismatch(es): {misshaped}")
    if problems:
        raise ConversionError(f"{source_name} does not fit the Paddle model: " + "; ".join(problems))
    return out


def _paddle_shapes(layer) -> "OrderedDict[str, tuple]":
    return OrderedDict((k, tuple(v.shape)) for k, v in layer.state_dict().items())


def convert_mmdet_state_dict(state_dict: Mapping[str, object], model=None,
                             source_name: str = "checkpoint") -> "OrderedDict[str, np.ndarray]":
    """mmdet RetinaNet state dict -> state dict of ``paddle_impl.model.detector.RetinaNet``."""
    if model is None:
        from paddle_impl.model.detector import RetinaNet

        model = RetinaNet.from_config()
    defaults = {k: v.numpy() for k, v in model.state_dict().items()
                if k.startswith(OPTIONAL_PREFIXES) and k.endswith(OPTIONAL_SUFFIXES)}
    return convert_state_dict(state_dict, _paddle_shapes(model), source_name=source_name,
                              defaults=defaults)


def convert_torchvision_resnet50(state_dict: Mapping[str, object], model=None,
                                 source_name: str = "checkpoint") -> "OrderedDict[str, np.ndarray]":
    """torchvision ResNet-50 (ImageNet) state dict -> the detector's ``backbone.*`` keys.

    This is the reference's pretrained initialisation; the classifier ``fc`` is dropped.
    """
    if model is None:
        from paddle_impl.model.detector import RetinaNet

        model = RetinaNet.from_config()
    backbone_shapes = OrderedDict((k, s) for k, s in _paddle_shapes(model.backbone).items())
    converted = convert_state_dict(state_dict, backbone_shapes, source_name=source_name,
                                   ignore=lambda k: k in TORCHVISION_CLASSIFIER)
    return OrderedDict((f"backbone.{k}", v) for k, v in converted.items())


def save_paddle_state_dict(state_dict: Mapping[str, np.ndarray], out_path: str | os.PathLike) -> Path:
    """``paddle.save`` through the project's atomic writer: no partial output."""
    import paddle

    tensors = {k: paddle.to_tensor(v) for k, v in state_dict.items()}
    return atomic_write(out_path, lambda tmp: paddle.save(tensors, tmp))


def mmdet_to_paddle(in_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert an mmdet GHM RetinaNet checkpoint file into a ``.pdparams`` file."""
    from torch_ref.reference import load_mmdet_state_dict

    state_dict = load_mmdet_state_dict(in_path)
    converted = convert_mmdet_state_dict(state_dict, source_name=str(in_path))
    return save_paddle_state_dict(converted, out_path)


def torchvision_resnet50_to_paddle(in_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert torchvision's ``resnet50-*.pth`` into backbone weights (``backbone.*``)."""
    from torch_ref.reference import load_mmdet_state_dict

    state_dict = load_mmdet_state_dict(in_path)
    converted = convert_torchvision_resnet50(state_dict, source_name=str(in_path))
    return save_paddle_state_dict(converted, out_path)
