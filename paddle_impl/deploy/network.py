"""The detector as it is exported: the network and its post-processing in one program.

Inputs (all with the batch size N free, H and W free):

- ``images`` ``(N, 3, H, W)`` float32, normalised and padded as ``deploy.json`` says;
- ``img_shape`` ``(N, 2)`` float32, ``(h, w)`` of each resized image inside the input;
- ``inv_scale_factor`` ``(N, 2)`` float32, ``(1 / w_scale, 1 / h_scale)`` from the
  original image to ``img_shape``, each reciprocal taken in float64 (see
  :func:`paddle_impl.boxes.postprocess.image_tensors`).

Outputs, in order (``output_names()`` then ``DETECTION_NAMES`` of
:mod:`paddle_impl.deploy.model_dir`): the head's raw maps, ``cls_scores``
P3..P7 ``(N, A*C, H_l, W_l)`` then ``bbox_preds`` P3..P7 ``(N, A*4, H_l, W_l)``, which
the alignment compares; then the detections of
:func:`paddle_impl.boxes.postprocess.detect`: ``bboxes`` ``(K, 4)`` in original
image pixels, ``scores`` ``(K,)``, ``labels`` ``(K,)`` int64 and ``num`` ``(N,)``
int64, the detections of all images one after the other.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle

from paddle_impl.boxes.anchors import AnchorGenerator
from paddle_impl.boxes.box_coder import DeltaXYWHBBoxCoder
from paddle_impl.boxes.postprocess import Detections, detect, split_detections
from paddle_impl.deploy.model_dir import DETECTION_NAMES, INPUT_NAMES
from paddle_impl.model.detector import RetinaNet


class DeployedRetinaNet(paddle.nn.Layer):
    """``detector``'s network followed by its test-time post-processing (its ``test_cfg``)."""

    def __init__(self, detector: RetinaNet) -> None:
        super().__init__()
        self.detector = detector
        self.anchor_generator = AnchorGenerator.from_config()
        self.bbox_coder = DeltaXYWHBBoxCoder.from_config()

    def forward(self, images: paddle.Tensor, img_shape: paddle.Tensor,
                inv_scale_factor: paddle.Tensor) -> list[paddle.Tensor]:
        cls_scores, bbox_preds = self.detector(images)
        detections = detect(cls_scores, bbox_preds, img_shape, inv_scale_factor, self.detector.test_cfg,
                            self.anchor_generator, self.bbox_coder)
        return list(cls_scores) + list(bbox_preds) + list(detections)


def input_specs() -> list[paddle.static.InputSpec]:
    return [paddle.static.InputSpec([None, 3, None, None], "float32", name=INPUT_NAMES[0]),
            paddle.static.InputSpec([None, 2], "float32", name=INPUT_NAMES[1]),
            paddle.static.InputSpec([None, 2], "float32", name=INPUT_NAMES[2])]


def unpack(outputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[Detections]]:
    """The program's outputs as ``(raw maps, per-image Detections of paddle tensors)``."""
    raw, (bboxes, scores, labels, num) = list(outputs[:-len(DETECTION_NAMES)]), outputs[-len(DETECTION_NAMES):]
    return raw, split_detections(bboxes, scores, labels, num, paddle.to_tensor)
