"""A convolution followed by an optional ReLU, named like mmcv's ``ConvModule``.

mmdet's FPN and RetinaHead wrap every convolution in a ``ConvModule`` whose
state-dict keys are ``<name>.conv.weight`` / ``<name>.conv.bias``; mirroring
that nesting keeps weight conversion a one-to-one table.
"""
from __future__ import annotations

import paddle
from paddle import nn


class ConvModule(nn.Layer):
    """``Conv2D`` (with bias) then ReLU when ``with_relu``.

    Input ``(N, C_in, H, W)``, output ``(N, C_out, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, padding: int = 0, with_relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size,
                              stride=stride, padding=padding)
        self.activate = nn.ReLU() if with_relu else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.conv(x)
        if self.activate is not None:
            x = self.activate(x)
        return x
