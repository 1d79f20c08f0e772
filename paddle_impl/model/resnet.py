"""ResNet-50 backbone in mmdet's 'pytorch' style.

'pytorch' style puts the stride on the 3x3 convolution of a bottleneck (the
'caffe' style puts it on the first 1x1). Stage 1 and the stem are frozen and
every BatchNorm keeps its running statistics during training (``norm_eval``),
so fine-tuning from ImageNet weights never updates them: only the BN affine
parameters of stages 2-4 learn.

Parameter names follow mmdet's state dict: ``conv1``, ``bn1``,
``layer{1..4}.{block}.conv{1,2,3}``, ``bn{1,2,3}``, ``downsample.{0,1}``.
"""
from __future__ import annotations

from typing import Sequence

import paddle
from paddle import nn

# Bottleneck blocks per stage, by depth.
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4


def batch_norm(channels: int, momentum: float, eps: float) -> nn.BatchNorm2D:
    # Paddle's running-average momentum weights the old value: 1 - torch's.
    return nn.BatchNorm2D(channels, momentum=1.0 - momentum, epsilon=eps)


class Bottleneck(nn.Layer):
    """1x1 -> 3x3 (stride) -> 1x1 with an identity or projection shortcut.

    Input ``(N, in_channels, H, W)``, output ``(N, planes*4, H/stride, W/stride)``.
    One ReLU layer is applied three times, as in mmdet, so forward hooks see
    ``relu``, ``relu#1`` and ``relu#2``.
    """

    def __init__(self, in_channels: int, planes: int, stride: int,
                 bn_momentum: float, bn_eps: float):
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2D(in_channels, planes, 1, bias_attr=False)
        self.bn1 = batch_norm(planes, bn_momentum, bn_eps)
        self.conv2 = nn.Conv2D(planes, planes, 3, stride=stride, padding=1, bias_attr=False)
        self.bn2 = batch_norm(planes, bn_momentum, bn_eps)
        self.conv3 = nn.Conv2D(planes, out_channels, 1, bias_attr=False)
        self.bn3 = batch_norm(out_channels, bn_momentum, bn_eps)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2D(in_channels, out_channels, 1, stride=stride, bias_attr=False),
                batch_norm(out_channels, bn_momentum, bn_eps),
            )
        else:
            self.downsample = None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # The shortcut runs last, as in mmdet, so layer tables list the same order.
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Layer):
    """ResNet backbone returning the outputs of the stages in ``out_indices``.

    Input ``(N, 3, H, W)``; with ``out_indices=(0, 1, 2, 3)`` the outputs are
    C2..C5 of shapes ``(N, 256, H/4, W/4)``, ``(N, 512, H/8, W/8)``,
    ``(N, 1024, H/16, W/16)`` and ``(N, 2048, H/32, W/32)`` (sizes rounded up).
    """

    def __init__(self, depth: int = 50, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = 1, norm_eval: bool = True,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5, **unused_style):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"unsupported ResNet depth {depth}; known: {sorted(STAGE_BLOCKS)}")
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        self.conv1 = nn.Conv2D(3, 64, 7, stride=2, padding=3, bias_attr=False)
        self.bn1 = batch_norm(64, bn_momentum, bn_eps)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2D(kernel_size=3, stride=2, padding=1)

        self.res_layers: list[str] = []
        in_channels = 64
        for i, num_blocks in enumerate(STAGE_BLOCKS[depth]):
            planes = 64 * 2 ** i
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(num_blocks):
                blocks.append(Bottleneck(in_channels, planes, stride if b == 0 else 1,
                                         bn_momentum, bn_eps))
                in_channels = planes * EXPANSION
            name = f"layer{i + 1}"
            self.add_sublayer(name, nn.Sequential(*blocks))
            self.res_layers.append(name)

        self._init_weights()
        self._freeze_stages()

    def _init_weights(self) -> None:
        # He (fan-out) init for convolutions, unit BN, and zero scale on the
        # last BN of each block (each block starts as an identity), as mmdet's
        # ResNet does when no pretrained checkpoint is given.
        for layer in self.sublayers():
            if isinstance(layer, nn.Conv2D):
                fan_out = layer.weight.shape[0] * layer.weight.shape[2] * layer.weight.shape[3]
                nn.initializer.Normal(0.0, (2.0 / fan_out) ** 0.5)(layer.weight)
            elif isinstance(layer, nn.BatchNorm2D):
                nn.initializer.Constant(1.0)(layer.weight)
                nn.initializer.Constant(0.0)(layer.bias)
        for layer in self.sublayers():
            if isinstance(layer, Bottleneck):
                nn.initializer.Constant(0.0)(layer.bn3.weight)

    def frozen_layers(self) -> list[nn.Layer]:
        """The stem and the first ``frozen_stages`` stages."""
        if self.frozen_stages < 0:
            return []
        layers: list[nn.Layer] = [self.conv1, self.bn1]
        layers += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        return layers

    def _freeze_stages(self) -> None:
        for layer in self.frozen_layers():
            layer.eval()
            for param in layer.parameters():
                param.stop_gradient = True

    def _keep_frozen_modes(self) -> None:
        """Frozen stages and (``norm_eval``) every BN back to eval mode."""
        self._freeze_stages()
        if self.norm_eval:
            for layer in self.sublayers():
                if isinstance(layer, nn.BatchNorm2D):
                    layer.eval()

    def train(self):
        """Training mode, keeping frozen stages and (``norm_eval``) every BN in eval mode."""
        super().train()
        self._keep_frozen_modes()
        return self

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        if self.training:
            # A parent's train() sets every sublayer's flag directly without
            # calling ResNet.train(), so the frozen modes are restored here.
            self._keep_frozen_modes()
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
