"""Box regression targets ``(dx, dy, dw, dh)`` relative to anchors, as mmdet's DeltaXYWHBBoxCoder.

With an anchor of centre ``(px, py)`` and size ``(pw, ph)`` (``pw = x2 - x1``,
no +1) and a target box ``(gx, gy, gw, gh)``:
``dx = (gx - px) / pw``, ``dy = (gy - py) / ph``, ``dw = log(gw / pw)``,
``dh = log(gh / ph)``, then normalised as ``(d - mean) / std``.
"""
from __future__ import annotations

import math
from typing import Sequence

import paddle

from paddle_impl.config import get_config


class DeltaXYWHBBoxCoder:
    """Encode boxes as deltas from anchors and decode them back.

    Args:
        target_means: mean subtracted from each of ``(dx, dy, dw, dh)``.
        target_stds: std each of ``(dx, dy, dw, dh)`` is divided by.
        clip_border: clip decoded boxes to ``max_shape`` when one is given.
        add_ctr_clamp: limit the centre shift to ``ctr_clamp`` pixels and only
            bound ``dw, dh`` from above (YOLOF's variant).
        ctr_clamp: largest centre shift in pixels when ``add_ctr_clamp``.
    """

    def __init__(
        self,
        target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        clip_border: bool = True,
        add_ctr_clamp: bool = False,
        ctr_clamp: float = 32,
    ) -> None:
        self.means = [float(m) for m in target_means]
        self.stds = [float(s) for s in target_stds]
        self.clip_border = clip_border
        self.add_ctr_clamp = add_ctr_clamp
        self.ctr_clamp = ctr_clamp

    @classmethod
    def from_config(cls, cfg: dict | None = None) -> "DeltaXYWHBBoxCoder":
        """Build from ``cfg['bbox_head']['bbox_coder']`` (default: :func:`get_config`)."""
        cfg = get_config() if cfg is None else cfg
        coder = cfg["bbox_head"]["bbox_coder"]
        return cls(target_means=coder["target_means"], target_stds=coder["target_stds"])

    def encode(self, bboxes: paddle.Tensor, gt_bboxes: paddle.Tensor) -> paddle.Tensor:
        """Deltas that turn ``bboxes`` into ``gt_bboxes``.

        Args:
            bboxes: source boxes (anchors), ``(N, 4)`` or ``(..., N, 4)``.
            gt_bboxes: target boxes, same shape.

        Returns:
            ``(N, 4)`` (or ``(..., N, 4)``) float32 normalised deltas.
        """
        assert bboxes.shape == gt_bboxes.shape and bboxes.shape[-1] == 4, "matching (..., 4) boxes"
        bboxes = bboxes.astype("float32")
        gt_bboxes = gt_bboxes.astype("float32")
        px = (bboxes[..., 0] + bboxes[..., 2]) * 0.5
        py = (bboxes[..., 1] + bboxes[..., 3]) * 0.5
        pw = bboxes[..., 2] - bboxes[..., 0]
        ph = bboxes[..., 3] - bboxes[..., 1]
        gx = (gt_bboxes[..., 0] + gt_bboxes[..., 2]) * 0.5
        gy = (gt_bboxes[..., 1] + gt_bboxes[..., 3]) * 0.5
        gw = gt_bboxes[..., 2] - gt_bboxes[..., 0]
        gh = gt_bboxes[..., 3] - gt_bboxes[..., 1]
        deltas = paddle.stack(
            [(gx - px) / pw, (gy - py) / ph, paddle.log(gw / pw), paddle.log(gh / ph)], axis=-1
        )
        means = paddle.to_tensor(self.means, dtype="float32")
        stds = paddle.to_tensor(self.stds, dtype="float32")
        return (deltas - means) / stds

    def decode(
        self,
        bboxes: paddle.Tensor,
        deltas: paddle.Tensor,
        max_shape=None,
        wh_ratio_clip: float = 16 / 1000,
    ) -> paddle.Tensor:
        """Apply ``deltas`` to ``bboxes``.

        Args:
            bboxes: anchors, ``(N, 4)`` or ``(B, N, 4)``.
            deltas: ``(N, 4k)`` or ``(B, N, 4k)``; ``k`` sets of deltas per
                anchor (``k = 1`` for class-agnostic regression).
            max_shape: image ``(h, w)`` or ``(h, w, c)`` to clip to; for batched
                input also one shape per image, as a ``(B, 2+)`` sequence or tensor.
            wh_ratio_clip: ``dw`` and ``dh`` are clamped to
                ``+-|log(wh_ratio_clip)|`` so a box grows or shrinks at most
                1 / wh_ratio_clip times.

        Returns:
            Boxes ``(x1, y1, x2, y2)`` of ``deltas``' shape.
        """
        if paddle.in_dynamic_mode():
            # A traced program (export) has free sizes, known only when it runs.
            assert bboxes.shape[-1] == 4 and deltas.shape[-1] % 4 == 0, "boxes (.., 4), deltas (.., 4k)"
            assert deltas.shape[:-1] == bboxes.shape[:-1], "one box per row of deltas"
            if deltas.shape[-2] == 0:
                return deltas

        out_shape = deltas.shape
        num_sets = out_shape[-1] // 4
        # (..., N, k, 4) against the anchors as (..., N, 1, 4).
        deltas = deltas.reshape(out_shape[:-1] + [num_sets, 4])
        means = paddle.to_tensor(self.means, dtype=deltas.dtype)
        stds = paddle.to_tensor(self.stds, dtype=deltas.dtype)
        deltas = deltas * stds + means
        rois = bboxes.astype(deltas.dtype).unsqueeze(-2)

        pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
        pwh = rois[..., 2:] - rois[..., :2]
        shift = pwh * deltas[..., :2]
        dwh = deltas[..., 2:]
        max_ratio = abs(math.log(wh_ratio_clip))
        if self.add_ctr_clamp:
            shift = shift.clip(min=-self.ctr_clamp, max=self.ctr_clamp)
            dwh = dwh.clip(max=max_ratio)
        else:
            dwh = dwh.clip(min=-max_ratio, max=max_ratio)

        gxy = pxy + shift
        gwh = pwh * paddle.exp(dwh)
        boxes = paddle.concat([gxy - gwh * 0.5, gxy + gwh * 0.5], axis=-1)

        if self.clip_border and max_shape is not None:
            boxes = paddle.minimum(boxes.clip(min=0), self._clip_limits(max_shape, boxes))
        return boxes.reshape(out_shape)

    @staticmethod
    def _clip_limits(max_shape, boxes: paddle.Tensor) -> paddle.Tensor:
        """Upper bounds ``(w, h, w, h)`` shaped to broadcast against ``boxes (..., N, k, 4)``."""
        if isinstance(max_shape, (list, tuple)):
            shape = paddle.to_tensor(max_shape, dtype=boxes.dtype)
        else:
            shape = max_shape.astype(boxes.dtype)
        hw = shape[..., :2]
        limits = paddle.concat([hw[..., 1:2], hw[..., 0:1], hw[..., 1:2], hw[..., 0:1]], axis=-1)
        if limits.ndim == 2:
            # One shape per image: (B, 4) -> (B, 1, 1, 4).
            assert boxes.ndim == 4, "one max_shape per image of a batch"
            limits = limits.reshape([limits.shape[0], 1, 1, 4])
        return limits
