"""A seeded detector's weights in Paddle's format, for the tests of the programs that load them."""
from __future__ import annotations

from pathlib import Path

import paddle

from paddle_impl.model.detector import RetinaNet


def save_seeded_weights(folder: Path) -> Path:
    """``folder / model.pdparams``: the detector at seed 0 with a zero classification bias, so
    that its scores (0.5) pass the test-time threshold and every path has detections to compare."""
    paddle.seed(0)
    model = RetinaNet.from_config()
    paddle.assign(paddle.zeros_like(model.bbox_head.retina_cls.bias), output=model.bbox_head.retina_cls.bias)
    path = folder / "model.pdparams"
    paddle.save(model.state_dict(), str(path))
    return path
