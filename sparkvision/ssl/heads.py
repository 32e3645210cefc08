"""Projection and prediction heads for SimCLR, SimSiam and the paper's improved SimCLR."""

from __future__ import annotations

import torch
from torch import nn


def _block(d_in: int, d_out: int, relu: bool = True) -> list[nn.Module]:
    """FC + BN (+ ReLU): the layer both the projector and the paper's predictor are built of."""
    layers: list[nn.Module] = [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class ProjectionMLP(nn.Module):
    """SimSiam-style projector: ``num_layers`` FC+BN layers, ReLU after all but the last.

    Chen & He 2021 (https://arxiv.org/abs/2011.10566), sec. 4: "The projection MLP has BN applied
    to each fully-connected layer, including its output fc. Its output fc has no ReLU. The hidden
    fc is 2048-d. This MLP has 3 layers." The improved-SimCLR paper uses output dimension 1024,
    our default.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 1024, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += _block(dims[i], dims[i + 1], relu=i < num_layers - 1)
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.net(x)


class ImprovedPredictor(nn.Module):
    """The improved-SimCLR paper's predictor: a 2-layer MLP with output dimension 1024 whose
    hidden layer is built like the projector's layers (FC + BN + ReLU) and which keeps a final
    ReLU (FC + BN + ReLU again), instead of SimSiam's linear bottleneck output."""

    def __init__(self, in_dim: int = 1024, hidden_dim: int = 1024, out_dim: int = 1024) -> None:
        super().__init__()
        self.net = nn.Sequential(*_block(in_dim, hidden_dim), *_block(hidden_dim, out_dim, relu=True))
        self.out_dim = out_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.net(z)


class BottleneckPredictor(nn.Module):
    """Plain SimSiam's predictor h: FC+BN+ReLU to width/4, then a plain FC back to the width.

    Chen & He 2021, sec. 4: "The prediction MLP has BN applied to its hidden fc layers. Its
    output fc does not have BN or ReLU. This MLP has 2 layers. ... h's hidden layer's dimension is
    512, making h a bottleneck structure" (input and output 2048).
    """

    def __init__(self, dim: int = 1024, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or max(1, dim // 4)
        self.net = nn.Sequential(*_block(dim, hidden), nn.Linear(hidden, dim))
        self.out_dim = dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, dim) -> (B, dim)
        return self.net(z)


class SimCLRProjectionHead(nn.Module):
    """SimCLR's g(.): Linear -> ReLU -> Linear (Chen et al. 2020, https://arxiv.org/abs/2002.05709,
    sec. 2.1, "a MLP with one hidden layer"; 128-d output as in the paper). BN on the hidden
    layer as in SimCLR's reference implementation."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(*_block(in_dim, hidden_dim), nn.Linear(hidden_dim, out_dim))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.net(x)
