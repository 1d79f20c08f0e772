"""An export folder: what ``python -m paddle_impl.export`` writes and what the inference backends read.

Layout (names from ``get_config()['deploy']``)::

    DIR/model.json        Paddle's static program (PIR): network and post-processing
    DIR/model.pdiparams   its weights
    DIR/model.onnx        the same program converted by paddle2onnx
    DIR/deploy.json       the preprocessing, the inputs and outputs, the test_cfg and the provenance

The program (:mod:`paddle_impl.deploy.network`) takes ``images`` ``(N, 3, H, W)``,
``img_shape`` ``(N, 2)`` and ``inv_scale_factor`` ``(N, 2)``, and returns the head's
raw maps level by level (``cls_scores`` P3..P7, then ``bbox_preds`` P3..P7) followed
by the detections ``bboxes``, ``scores``, ``labels``, ``num``. paddle2onnx converts
the NMS for one image per run, so the ONNX model is run image by image.

``deploy.json`` holds what a user of the model needs to feed it: the test
Resize bound (keep ratio), the BGR->RGB swap, the per-channel mean and std in
RGB order, the padding divisor and value; the input and output names in order;
the test_cfg; the weights' sha256 and the package versions that made it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InputError
from paddle_impl.config import get_config

SPEC_VERSION = 2
LEVELS = ("P3", "P4", "P5", "P6", "P7")
INPUT_NAMES = ("images", "img_shape", "inv_scale_factor")
DETECTION_NAMES = ("bboxes", "scores", "labels", "num")


def output_names(levels: int = len(LEVELS)) -> list[str]:
    """Names of the head's raw outputs, in the program's output order (the detections follow them)."""
    return [f"cls_score_{name}" for name in LEVELS[:levels]] + [f"bbox_pred_{name}" for name in LEVELS[:levels]]


@dataclass(frozen=True)
class ModelDir:
    """The files of one export folder (they need not exist yet)."""

    root: Path

    @property
    def _deploy(self) -> dict[str, Any]:
        return get_config()["deploy"]

    @property
    def prefix(self) -> Path:
        return self.root / self._deploy["model_prefix"]

    @property
    def program(self) -> Path:
        return self.prefix.with_suffix(".json")

    @property
    def params(self) -> Path:
        return self.prefix.with_suffix(".pdiparams")

    @property
    def onnx(self) -> Path:
        return self.root / self._deploy["onnx_file"]

    @property
    def spec_path(self) -> Path:
        return self.root / self._deploy["spec_file"]

    def spec(self) -> dict[str, Any]:
        """``deploy.json``, checked; an :class:`InputError` naming the folder when it is not an export."""
        if not self.root.is_dir():
            raise InputError(f"--model {self.root}: folder not found")
        if not self.spec_path.is_file():
            raise InputError(f"--model {self.root}: no {self.spec_path.name}; not a folder written by "
                             f"python -m paddle_impl.export")
        try:
            spec = json.loads(self.spec_path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"--model {self.spec_path}: unreadable ({err})") from None
        if not isinstance(spec, dict) or spec.get("spec_version") != SPEC_VERSION:
            raise InputError(f"--model {self.spec_path}: not a version {SPEC_VERSION} export description")
        return spec

    def require(self, backend: str) -> None:
        """The files ``backend`` reads exist, or an :class:`InputError` naming the first missing one."""
        needed = [self.onnx] if backend == "onnxruntime" else [self.program, self.params]
        for path in needed:
            if not path.is_file():
                raise InputError(f"--model {self.root}: {path.name} missing (backend {backend})")


def preprocessing_spec(scale: tuple[int, int] | None = None) -> dict[str, Any]:
    """The test-time preprocessing of our data pipeline, as data (``deploy.json['preprocess']``).

    The code that applies it is :func:`paddle_impl.data.transforms.test_pipeline`
    (resize) and :class:`paddle_impl.data.transforms.Collate` (normalise, pad).
    """
    cfg = get_config()
    pre, data = cfg["data_preprocessor"], cfg["data"]
    size = list(scale or data["test_scale"])
    return {
        "resize": {"scale_wh": size, "keep_ratio": True,
                   "rule": "factor = min(max(scale)/max(h, w), min(scale)/min(h, w)); side = int(side * factor + 0.5); "
                           "bilinear (cv2.INTER_LINEAR)"},
        "channel_order_in": "BGR (OpenCV decode)",
        "bgr_to_rgb": pre["bgr_to_rgb"],
        "mean_rgb": pre["mean"],
        "std_rgb": pre["std"],
        "normalise": "(x - mean) / std in float32, after the channel swap",
        "pad_size_divisor": pre["pad_size_divisor"],
        "pad_value": data["pad_value"],
        "pad": "bottom and right, to a multiple of pad_size_divisor (a batch: to its largest image, then that)",
        "layout": "NCHW float32",
    }
