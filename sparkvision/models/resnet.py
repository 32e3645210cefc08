"""torchvision's ResNet-18 adapted to small images (CIFAR-style stem, as in He et al. 2016 §4.2):
a 3x3 stride-1 first convolution and no first max-pool, so a 28x28 or 32x32 image keeps enough
resolution through the four stages. No pretrained download: weights come from a user's file.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from sparkvision.models.registry import ImageModel, register_model


class SmallResNet18(ImageModel):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        net = tv_resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.num_features = net.fc.in_features  # 512
        net.fc = nn.Identity()
        self.backbone = net
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 512)
        return self.backbone(x)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 1, **kw) -> SmallResNet18:
    return SmallResNet18(num_classes=num_classes, in_channels=in_channels, **kw)
