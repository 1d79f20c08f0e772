"""RetinaNet head: two towers of 3x3 convolutions shared across FPN levels.

The classification tower ends in ``retina_cls`` with ``A*C`` channels and the
regression tower in ``retina_reg`` with ``A*4`` channels, where A = 9 anchors
per location in mmdet's ratio-major order (channel ``a*C + c`` is class c of
anchor a; ``a*4 + k`` is delta k = dx, dy, dw, dh of anchor a).

Parameter names follow mmdet: ``cls_convs.{i}.conv``, ``reg_convs.{i}.conv``,
``retina_cls``, ``retina_reg``. As in mmdet, the head owns its losses
(``loss_cls``, ``loss_bbox``), whose GHM momentum buffers are part of the
model's state and so of every checkpoint.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import paddle
from paddle import nn

from paddle_impl.model.conv_module import ConvModule

if TYPE_CHECKING:
    from paddle_impl.boxes.targets import BatchTargets


class RetinaHead(nn.Layer):
    """Per level, input ``(N, in_channels, H, W)``; outputs
    cls_score ``(N, A*C, H, W)`` (logits) and bbox_pred ``(N, A*4, H, W)``.
    """

    def __init__(self, num_classes: int, in_channels: int, num_anchors: int,
                 stacked_convs: int = 4, feat_channels: int = 256,
                 init_std: float = 0.01, prior_prob: float = 0.01,
                 loss_cls: nn.Layer | None = None, loss_bbox: nn.Layer | None = None):
        super().__init__()
        self.loss_cls = loss_cls
        self.loss_bbox = loss_bbox
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.cls_convs = nn.LayerList()
        self.reg_convs = nn.LayerList()
        for i in range(stacked_convs):
            channels = in_channels if i == 0 else feat_channels
            self.cls_convs.append(ConvModule(channels, feat_channels, 3, padding=1, with_relu=True))
            self.reg_convs.append(ConvModule(channels, feat_channels, 3, padding=1, with_relu=True))
        self.retina_cls = nn.Conv2D(feat_channels, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2D(feat_channels, num_anchors * 4, 3, padding=1)
        self._init_weights(init_std, prior_prob)

    def _init_weights(self, std: float, prior_prob: float) -> None:
        for layer in self.sublayers():
            if isinstance(layer, nn.Conv2D):
                nn.initializer.Normal(0.0, std)(layer.weight)
                nn.initializer.Constant(0.0)(layer.bias)
        # Start every anchor at foreground probability prior_prob, so the
        # ~100k background anchors do not swamp the first iterations.
        bias = -math.log((1.0 - prior_prob) / prior_prob)
        nn.initializer.Constant(bias)(self.retina_cls.bias)

    def forward_single(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        cls_feat, reg_feat = x, x
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs:
            reg_feat = conv(reg_feat)
        return self.retina_cls(cls_feat), self.retina_reg(reg_feat)

    def loss(self, cls_scores: Sequence[paddle.Tensor], bbox_preds: Sequence[paddle.Tensor],
             targets: "BatchTargets") -> dict[str, list[paddle.Tensor]]:
        """GHM-C and GHM-R losses, one call of each per FPN level in level order.

        The per-level calls matter: each GHM call computes its gradient-density
        statistics over that level of the whole batch and updates the one
        momentum buffer its module keeps for all levels, as mmdet does.

        Args:
            cls_scores: per level ``(N, A*C, H, W)``.
            bbox_preds: per level ``(N, A*4, H, W)``.
            targets: from :class:`paddle_impl.boxes.targets.AnchorTargetBuilder`.

        Returns:
            ``{'loss_cls': [5 scalars], 'loss_bbox': [5 scalars]}``.
        """
        losses_cls, losses_bbox = [], []
        for cls_score, bbox_pred, t in zip(cls_scores, bbox_preds, targets.levels):
            # (N, A*C, H, W) -> (N*H*W*A, C): image, then location, then anchor,
            # the order the anchors and targets are laid out in.
            cls_flat = cls_score.transpose([0, 2, 3, 1]).reshape([-1, self.num_classes])
            box_flat = bbox_pred.transpose([0, 2, 3, 1]).reshape([-1, 4])
            losses_cls.append(self.loss_cls(cls_flat, t.labels.reshape([-1]),
                                            t.label_weights.reshape([-1])))
            losses_bbox.append(self.loss_bbox(box_flat, t.bbox_targets.reshape([-1, 4]),
                                              t.bbox_weights.reshape([-1, 4])))
        return {"loss_cls": losses_cls, "loss_bbox": losses_bbox}

    def forward(self, feats: Sequence[paddle.Tensor]) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
        """Per-level lists ``cls_scores`` and ``bbox_preds`` in level order."""
        cls_scores, bbox_preds = [], []
        for x in feats:
            cls_score, bbox_pred = self.forward_single(x)
            cls_scores.append(cls_score)
            bbox_preds.append(bbox_pred)
        return cls_scores, bbox_preds
