"""RetinaNet anchors on a multi-level feature pyramid, as mmdet 3.3.0 lays them out.

Layout of one level with feature size (H, W) and A base anchors:

- base anchors are centred at (0, 0); anchor index ``a = ratio_index * num_scales
  + scale_index`` (ratio-major), so head output channel ``a * C + c`` belongs to
  anchor ``a``;
- location ``(y, x)`` shifts them by ``(x * stride, y * stride)``, with no
  half-stride offset;
- the flattened level is ``(H * W * A, 4)``: locations row-major, then anchors.

Boxes are ``(x1, y1, x2, y2)`` in float32 pixels of the padded input.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import paddle

from paddle_impl.config import get_config


class AnchorGenerator:
    """Anchors of every pyramid level and their validity inside a padded image.

    Args:
        strides: stride of each level in input pixels, e.g. ``[8, 16, 32, 64, 128]``;
            it is also the base size of that level's anchors.
        ratios: height / width ratios, e.g. ``[0.5, 1.0, 2.0]``.
        octave_base_scale: scale of the first anchor of an octave, in strides.
        scales_per_octave: anchors per octave; scale ``i`` is
            ``octave_base_scale * 2 ** (i / scales_per_octave)``.
    """

    def __init__(
        self,
        strides: Sequence[int],
        ratios: Sequence[float],
        octave_base_scale: float,
        scales_per_octave: int,
    ) -> None:
        self.strides = [int(s) for s in strides]
        self.ratios = [float(r) for r in ratios]
        self.octave_base_scale = octave_base_scale
        self.scales_per_octave = int(scales_per_octave)
        # Scales are formed in float64 and rounded once to float32, which is
        # the rounding mmdet's anchors carry.
        octave_scales = np.array([2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
        self.scales = (octave_scales * octave_base_scale).astype(np.float32)
        self.base_anchors = [self._level_base_anchors(s) for s in self.strides]
        self._base_anchor_values = [a.numpy() for a in self.base_anchors]

    @classmethod
    def from_config(cls, cfg: dict | None = None) -> "AnchorGenerator":
        """Build from ``cfg['bbox_head']['anchor_generator']`` (default: :func:`get_config`)."""
        cfg = get_config() if cfg is None else cfg
        gen = cfg["bbox_head"]["anchor_generator"]
        return cls(
            strides=gen["strides"],
            ratios=gen["ratios"],
            octave_base_scale=gen["octave_base_scale"],
            scales_per_octave=gen["scales_per_octave"],
        )

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> list[int]:
        """Anchors per feature location, one entry per level."""
        return [len(self.ratios) * len(self.scales)] * self.num_levels

    def _level_base_anchors(self, base_size: int) -> paddle.Tensor:
        """Base anchors of one level, ``(A, 4)`` centred at the origin, ratio-major."""
        ratios = paddle.to_tensor(self.ratios, dtype="float32")
        scales = paddle.to_tensor(self.scales, dtype="float32")
        h_ratios = paddle.sqrt(ratios)
        w_ratios = 1.0 / h_ratios
        # Same float32 operation order as mmdet ((size * ratio) * scale), so
        # the anchors agree bit for bit.
        ws = ((base_size * w_ratios).unsqueeze(1) * scales.unsqueeze(0)).reshape([-1])
        hs = ((base_size * h_ratios).unsqueeze(1) * scales.unsqueeze(0)).reshape([-1])
        return paddle.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=-1)

    def single_level_anchors(self, featmap_size: Sequence[int], level: int) -> paddle.Tensor:
        """Anchors of one level for a feature map of size ``(H, W)``: ``(H * W * A, 4)``."""
        feat_h, feat_w = int(featmap_size[0]), int(featmap_size[1])
        stride = self.strides[level]
        shift_x = paddle.arange(feat_w, dtype="float32") * stride
        shift_y = paddle.arange(feat_h, dtype="float32") * stride
        # Row-major locations: x varies fastest.
        shift_yy, shift_xx = paddle.meshgrid(shift_y, shift_x)
        shift_xx = shift_xx.reshape([-1])
        shift_yy = shift_yy.reshape([-1])
        shifts = paddle.stack([shift_xx, shift_yy, shift_xx, shift_yy], axis=-1)
        anchors = self.base_anchors[level].unsqueeze(0) + shifts.unsqueeze(1)
        return anchors.reshape([-1, 4])

    def anchors_at(self, level: int, anchor_idxs: paddle.Tensor, feat_w) -> paddle.Tensor:
        """The anchors of flat indices ``anchor_idxs`` (any shape, int64) into one level's
        ``(H * W * A, 4)`` layout, on a feature map ``feat_w`` wide (an int or a 0-d tensor).

        Returns ``anchor_idxs.shape + (4,)`` float32, equal bit for bit to the rows of
        :meth:`single_level_anchors`; only the asked rows are formed, and the feature
        height is not needed, so an exported program takes it from the input's shape.
        """
        num_anchors = len(self._base_anchor_values[level])
        location = anchor_idxs // num_anchors
        stride = self.strides[level]
        shift_x = (location % feat_w).astype("float32") * stride
        shift_y = (location // feat_w).astype("float32") * stride
        shifts = paddle.stack([shift_x, shift_y, shift_x, shift_y], axis=-1)
        # A table look-up keeps the index's shape, whose batch size an exported program leaves
        # free; the table is made from its values here, so a traced program holds it as a constant.
        table = paddle.assign(self._base_anchor_values[level])
        base = paddle.nn.functional.embedding(anchor_idxs % num_anchors, table)
        return base + shifts

    def grid_anchors(self, featmap_sizes: Sequence[Sequence[int]]) -> list[paddle.Tensor]:
        """Anchors of every level.

        Args:
            featmap_sizes: ``(H_l, W_l)`` of each level, in level order.

        Returns:
            One ``(H_l * W_l * A, 4)`` float32 tensor per level.
        """
        assert len(featmap_sizes) == self.num_levels, "one feature size per level"
        return [self.single_level_anchors(size, i) for i, size in enumerate(featmap_sizes)]

    def single_level_valid_flags(
        self, featmap_size: Sequence[int], valid_size: Sequence[int], num_base_anchors: int
    ) -> paddle.Tensor:
        """``(H * W * A,)`` bool: True where the location lies in the first
        ``valid_size = (valid_h, valid_w)`` rows and columns."""
        feat_h, feat_w = int(featmap_size[0]), int(featmap_size[1])
        valid_h, valid_w = int(valid_size[0]), int(valid_size[1])
        valid_y = paddle.arange(feat_h) < valid_h
        valid_x = paddle.arange(feat_w) < valid_w
        valid = paddle.logical_and(valid_y.unsqueeze(1), valid_x.unsqueeze(0)).reshape([-1, 1])
        return valid.expand([feat_h * feat_w, num_base_anchors]).reshape([-1])

    def valid_flags(
        self, featmap_sizes: Sequence[Sequence[int]], pad_shape: Sequence[int]
    ) -> list[paddle.Tensor]:
        """Which anchors belong to the image's own padded area.

        A location is valid when it lies within ``ceil(pad / stride)`` rows and
        columns (capped at the feature size): in a batch padded to its largest
        image, the locations beyond a smaller image's padded extent are not.

        Args:
            featmap_sizes: ``(H_l, W_l)`` of each level.
            pad_shape: the image's padded ``(h, w)`` or ``(h, w, c)``.

        Returns:
            One ``(H_l * W_l * A,)`` bool tensor per level.
        """
        assert len(featmap_sizes) == self.num_levels, "one feature size per level"
        pad_h, pad_w = pad_shape[0], pad_shape[1]
        flags = []
        for i, (feat_h, feat_w) in enumerate(featmap_sizes):
            stride = self.strides[i]
            valid_h = min(int(math.ceil(pad_h / stride)), int(feat_h))
            valid_w = min(int(math.ceil(pad_w / stride)), int(feat_w))
            flags.append(
                self.single_level_valid_flags(
                    (feat_h, feat_w), (valid_h, valid_w), self.num_base_anchors[i]
                )
            )
        return flags
