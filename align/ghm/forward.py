"""The GHM RetinaNet as a pair of the forward stage: mmdet's model from the checkpoint, ours from
its conversion, on seeded images normalized as mmdet's data preprocessor does.

Compared outputs: backbone C2..C5, FPN P3..P7, and per level the head's ``cls_score``
``(N, A*C, H, W)`` and ``bbox_pred`` ``(N, A*4, H, W)``; both models run piece by piece
(backbone, neck, head) so the intermediate outputs are kept. Paddle's parameter names are
mmdet's, so the name map is the identity.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from align.engine.weights import NameMap
from align.ghm.pair import (Checkpoints, build_paddle_model, build_torch_model, check_perturb, parse_shape,
                            prepare_checkpoints, seeded_images)
from align.engine.environment import source_digest
from align.ghm.suite import reference_versions, write_report

DEFAULT_SHAPE = "2x3x800x1344"
# The code that builds and records mmdet's side (part of the cache key): a change to it is a new reference.
REFERENCE_CODE = ("torch_ref", "align.ghm", "align.engine.capture", "align.forward.stage")
BACKBONE_NAMES = ["C2", "C3", "C4", "C5"]
FPN_NAMES = ["P3", "P4", "P5", "P6", "P7"]


def named_outputs(backbone_outs, fpn_outs, cls_scores, bbox_preds) -> dict[str, Any]:
    """The compared outputs under stable names, in execution order."""
    out = {}
    for name, t in zip(BACKBONE_NAMES, backbone_outs):
        out[f"backbone.{name}"] = t
    for name, t in zip(FPN_NAMES, fpn_outs):
        out[f"neck.{name}"] = t
    for name, c, b in zip(FPN_NAMES, cls_scores, bbox_preds):
        out[f"head.cls_score.{name}"] = c
        out[f"head.bbox_pred.{name}"] = b
    return out


class GhmForward:
    """mmdet's GHM RetinaNet and ours (see the module docstring) for `align.forward.stage`.

    Args:
        ckpt: an mmdet checkpoint; None for the seeded synthetic one (made once under ``build_dir``).
        shape: the input ``NxCxHxW`` with C = 3 (default `DEFAULT_SHAPE`).
        seed: of the synthetic checkpoint and of the images.
        build_dir: where the checkpoint and its conversion are kept.
        perturb: the parameter the stage will perturb, checked before anything is made.
    """

    stage = "forward"
    title = "Forward: mmdet GHM RetinaNet vs Paddle"
    reference = "mmdet"
    name_map = NameMap()
    # mmdet's layer records at 2x3x800x1344 take gigabytes: isolated runs spill them to disk.
    spill = True

    def __init__(self, ckpt: Optional[str], shape: Optional[str], seed: int, build_dir: Path,
                 perturb: Optional[str] = None):
        shape = parse_shape(shape or DEFAULT_SHAPE)
        check_perturb(perturb)
        self.seed = seed
        self.ckpts: Checkpoints = prepare_checkpoints(ckpt, seed, build_dir)
        self.paddle_model = build_paddle_model(self.ckpts)
        self.inputs = seeded_images(shape, seed)
        self._torch_model = None
        self.meta = {
            "input": "seeded 8-bit RGB pixels normalized with the reference mean/std",
            "checkpoint": str(self.ckpts.torch_path),
            "checkpoint_sha256": self.ckpts.sha256,
            "checkpoint_synthetic": self.ckpts.synthetic,
            "paddle_weights": str(self.ckpts.paddle_path),
        }

    def torch_model(self):
        if self._torch_model is None:
            self._torch_model = build_torch_model(self.ckpts)
        return self._torch_model

    @staticmethod
    def torch_outputs(model, inputs: np.ndarray) -> dict[str, Any]:
        import torch

        c = model.backbone(torch.from_numpy(inputs))
        p = model.neck(c)
        return named_outputs(c, p, *model.bbox_head(p))

    @staticmethod
    def paddle_outputs(model, inputs: np.ndarray) -> dict[str, Any]:
        import paddle

        c = model.backbone(paddle.to_tensor(inputs))
        p = model.neck(c)
        return named_outputs(c, p, *model.bbox_head(p))

    def reference_key(self) -> dict:
        from paddle_impl.config import get_config

        return {"checkpoint": self.ckpts.sha256, "preprocessor": get_config()["data_preprocessor"],
                "versions": reference_versions(), "code": source_digest(*REFERENCE_CODE)}

    @staticmethod
    def write_report(result, reports):
        return write_report(result, reports)
