"""The Fashion-MNIST network of the source paper: two 5x5 convolutions, each followed by 2x2
max-pooling with stride 2, then a small MLP over the classes. BatchNorm and dropout are our
additions (allowed by the paper's description) and are what lift it from the paper's 84% to 93%+.
"""

from __future__ import annotations

import torch
from torch import nn

from sparkvision.models.registry import ImageModel, register_model


class SmallCNN(ImageModel):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int] = (32, 64),
        hidden: int = 512,
        dropout: float = 0.25,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        # Saved in the model directory, so a later change of defaults cannot break loading it.
        self.arch = {"widths": list(widths), "hidden": hidden, "dropout": dropout, "image_size": image_size}
        c1, c2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, stride=2),  # (B, c1, H/2, W/2)
            nn.Conv2d(c1, c2, 5, padding=2, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, stride=2),  # (B, c2, H/4, W/4)
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c2 * (image_size // 4) ** 2, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        )
        self.num_features = hidden
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, hidden)
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))


@register_model("cnn")
def cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kw) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)
