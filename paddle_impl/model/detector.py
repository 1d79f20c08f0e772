"""The GHM RetinaNet detector: backbone -> neck -> head, with its targets, losses and detections.

Sub-layer names (``backbone``, ``neck``, ``bbox_head``) and everything below
them mirror mmdet's ``RetinaNet`` state dict, so ``state_dict()`` keys equal
mmdet's except BN statistics (``_mean``/``_variance`` for
``running_mean``/``running_var``) and the absent ``num_batches_tracked``.
"""
from __future__ import annotations

from typing import Any, Sequence

import paddle
from paddle import nn

from paddle_impl.config import get_config
from paddle_impl.model.fpn import FPN
from paddle_impl.model.ghm_loss import GHMC, GHMR
from paddle_impl.model.resnet import ResNet
from paddle_impl.model.retina_head import RetinaHead
from paddle_impl.boxes.postprocess import Detections, predict_boxes
from paddle_impl.boxes.targets import AnchorTargetBuilder


class RetinaNet(nn.Layer):
    """Input: normalized, padded images ``(N, 3, H, W)``.

    ``forward`` returns per-level ``cls_scores`` ``(N, A*C, H_l, W_l)`` and
    ``bbox_preds`` ``(N, A*4, H_l, W_l)`` for the 5 FPN levels; :meth:`loss`
    the training losses per level; :meth:`predict` the detections.

    Args:
        backbone: images -> feature maps C2..C5 (:class:`ResNet`).
        neck: C2..C5 -> P3..P7 (:class:`FPN`).
        bbox_head: P3..P7 -> scores and deltas, and the losses given to it
            (:class:`RetinaHead` with GHM-C and GHM-R).
        target_builder: anchors and their training targets (:class:`AnchorTargetBuilder`).
        test_cfg: the post-processing settings of :meth:`predict`.
    """

    def __init__(self, backbone: nn.Layer, neck: nn.Layer, bbox_head: RetinaHead,
                 target_builder: AnchorTargetBuilder, test_cfg: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.bbox_head = bbox_head
        self.target_builder = target_builder
        self.test_cfg = test_cfg

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None = None) -> "RetinaNet":
        """The detector the configuration (default :func:`get_config`) describes."""
        cfg = cfg or get_config()
        b, n, h = cfg["backbone"], cfg["neck"], cfg["bbox_head"]
        anchors = h["anchor_generator"]
        backbone = ResNet(depth=b["depth"], out_indices=b["out_indices"],
                          frozen_stages=b["frozen_stages"], norm_eval=b["norm_eval"],
                          bn_momentum=b["bn_momentum"], bn_eps=b["bn_eps"])
        neck = FPN(in_channels=n["in_channels"], out_channels=n["out_channels"],
                   num_outs=n["num_outs"], start_level=n["start_level"],
                   add_extra_convs=n["add_extra_convs"],
                   relu_before_extra_convs=n["relu_before_extra_convs"])
        head = RetinaHead(
            num_classes=h["num_classes"], in_channels=h["in_channels"],
            num_anchors=len(anchors["ratios"]) * anchors["scales_per_octave"],
            stacked_convs=h["stacked_convs"], feat_channels=h["feat_channels"],
            init_std=h["init_std"], prior_prob=h["prior_prob"],
            loss_cls=GHMC(**h["loss_cls"]), loss_bbox=GHMR(**h["loss_bbox"]))
        return cls(backbone, neck, head, AnchorTargetBuilder.from_config(cfg), dict(cfg["test_cfg"]))

    def train(self):
        """Training mode; the backbone keeps its frozen stages and BN statistics."""
        super().train()
        self.backbone.train()
        return self

    def extract_feat(self, images: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        """FPN levels P3..P7, each ``(N, 256, H_l, W_l)``."""
        return self.neck(self.backbone(images))

    def loss(self, images: paddle.Tensor, gt_bboxes: Sequence, gt_labels: Sequence,
             pad_shapes: Sequence[Sequence[int]]) -> dict[str, list[paddle.Tensor]]:
        """Training losses per level (see :meth:`RetinaHead.loss`) for a batch.

        ``gt_bboxes`` / ``gt_labels``: per image ``(G_i, 4)`` / ``(G_i,)``;
        ``pad_shapes``: per image its own padded ``(h, w)``.
        """
        cls_scores, bbox_preds = self(images)
        targets = self.target_builder([s.shape[-2:] for s in cls_scores], gt_bboxes,
                                      gt_labels, pad_shapes)
        return self.bbox_head.loss(cls_scores, bbox_preds, targets)

    def forward(self, images: paddle.Tensor) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
        return self.bbox_head(self.extract_feat(images))

    def predict(self, images: paddle.Tensor, img_metas: Sequence[dict],
                cfg: dict[str, Any] | None = None) -> list[Detections]:
        """Detections of ``images`` in original image pixels (see :func:`predict_boxes`;
        ``img_metas`` per image ``img_shape`` and ``scale_factor``). Leaves eval mode on."""
        self.eval()
        with paddle.no_grad():
            cls_scores, bbox_preds = self(images)
        return predict_boxes(cls_scores, bbox_preds, img_metas, cfg=self.test_cfg if cfg is None else cfg)
