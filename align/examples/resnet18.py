"""ResNet-18, mmdet's (torch) against ``paddle.vision.models.resnet18``: both ship with the
installed packages and start from random weights, so nothing is downloaded.

    python -m align.pair --torch align.examples.resnet18:build_torch \
        --paddle align.examples.resnet18:build_paddle --map align/examples/resnet18_map.json \
        --isolate --backward

mmdet's ``ResNet`` is a backbone; the torch side adds the classifier Paddle's
model has (global average pool, flatten, a 1000-way linear layer), so both
compute the same function once the weights are carried over. The name map
drops mmdet's ``backbone.`` prefix and names the pool as Paddle does.
"""
from __future__ import annotations

from pathlib import Path

NAME_MAP = Path(__file__).with_name("resnet18_map.json")


def build_torch(num_classes: int = 1000):
    import torch
    from mmdet.models.backbones import ResNet

    class ResNet18Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = ResNet(depth=18, out_indices=(3,))
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(512, num_classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.backbone(x)[-1]), 1))

    torch.manual_seed(0)
    return ResNet18Classifier().eval()


def build_paddle(num_classes: int = 1000):
    from paddle.vision.models import resnet18

    model = resnet18(pretrained=False, num_classes=num_classes)
    model.eval()
    return model
