"""Feature pyramid network, as mmdet's ``FPN`` with ``add_extra_convs='on_input'``.

From backbone outputs C2..C5 and ``start_level=1`` it builds P3..P5 by 1x1
lateral convolutions plus nearest-neighbour top-down upsampling, smooths each
with a 3x3 convolution, then adds P6 as a stride-2 3x3 convolution on C5 and
P7 as a stride-2 3x3 convolution on P6. mmdet applies no ReLU before P7
(``relu_before_extra_convs=False``), unlike the RetinaNet paper.

Parameter names follow mmdet: ``lateral_convs.{i}.conv``, ``fpn_convs.{i}.conv``.
"""
from __future__ import annotations

from typing import Sequence

import paddle
import paddle.nn.functional as F
from paddle import nn

from paddle_impl.model.conv_module import ConvModule


def upsample_nearest_to(x: paddle.Tensor, like: paddle.Tensor) -> paddle.Tensor:
    """``x`` ``(N, C, h, w)`` upsampled by nearest neighbour to ``like``'s ``(H, W)``,
    where ``h = ceil(H / 2)`` and ``w = ceil(W / 2)`` (a stride-2 level above ``like``).

    Equal element for element to ``F.interpolate(x, size=(H, W), mode="nearest")``,
    mmdet's top-down step: for those sizes nearest neighbour takes source row
    ``floor(i * h / H) = floor(i / 2)``, i.e. every row and column twice, the
    last one cut off when ``H`` is odd. It is written as a copy (expand,
    flatten, slice) rather than an interpolation because Paddle's exported
    ``nearest_interp`` carries a float-list attribute that Paddle Inference's
    oneDNN executor cannot convert (docs/deploy.md gives the reproduction); the
    copy has no such attribute, and H and W may be unknown when exporting.
    """
    doubled = x.unsqueeze([3, 5]).expand([-1, -1, -1, 2, -1, 2]).flatten(2, 3).flatten(3, 4)
    height, width = like.shape[2], like.shape[3]
    return doubled[:, :, :height, :width]


class FPN(nn.Layer):
    """Inputs: backbone features ``(N, in_channels[i], H_i, W_i)``.

    Outputs: ``num_outs`` maps ``(N, out_channels, H_l, W_l)``; for RetinaNet
    P3..P7 at strides 8, 16, 32, 64, 128.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int,
                 start_level: int = 0, add_extra_convs: str = "on_input",
                 relu_before_extra_convs: bool = False):
        super().__init__()
        if add_extra_convs != "on_input":
            raise ValueError(f"only add_extra_convs='on_input' is implemented, got {add_extra_convs!r}")
        self.in_channels = list(in_channels)
        self.start_level = start_level
        self.num_outs = num_outs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.num_used = len(self.in_channels) - start_level

        self.lateral_convs = nn.LayerList([
            ConvModule(c, out_channels, 1) for c in self.in_channels[start_level:]])
        fpn_convs = [ConvModule(out_channels, out_channels, 3, padding=1)
                     for _ in range(self.num_used)]
        for i in range(num_outs - self.num_used):
            source_channels = self.in_channels[-1] if i == 0 else out_channels
            fpn_convs.append(ConvModule(source_channels, out_channels, 3, stride=2, padding=1))
        self.fpn_convs = nn.LayerList(fpn_convs)
        self._init_weights()

    def _init_weights(self) -> None:
        for layer in self.sublayers():
            if isinstance(layer, nn.Conv2D):
                nn.initializer.XavierUniform()(layer.weight)
                nn.initializer.Constant(0.0)(layer.bias)

    def forward(self, inputs: Sequence[paddle.Tensor]) -> tuple[paddle.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} inputs, got {len(inputs)}")
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(self.num_used - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + upsample_nearest_to(laterals[i], laterals[i - 1])
        outs = [self.fpn_convs[i](laterals[i]) for i in range(self.num_used)]
        # Extra levels: the first from the last backbone output ('on_input').
        extra_input = inputs[-1]
        for i in range(self.num_used, self.num_outs):
            if i > self.num_used and self.relu_before_extra_convs:
                extra_input = F.relu(extra_input)
            extra_input = self.fpn_convs[i](extra_input)
            outs.append(extra_input)
        return tuple(outs)
