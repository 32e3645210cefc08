"""The three self-supervised methods as small modules: an encoder from the model registry, their
heads and their loss. ``forward(x1, x2)`` takes two views and returns ``(loss, z)``, ``z`` being
the first view's projector output (what the collapse monitor watches).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from sparkvision.models import ImageModel
from sparkvision.ssl.heads import BottleneckPredictor, ImprovedPredictor, ProjectionMLP, SimCLRProjectionHead
from sparkvision.ssl.losses import NegativeCosineSimilarity, NTXentLoss

Method = Literal["improved-simclr", "simsiam", "simclr"]
METHODS: tuple[str, ...] = get_args(Method)


class SSLMethod(nn.Module):
    """Base: holds the encoder. Its classifier head is replaced by the identity while pretraining
    (it is not trained, and DDP must not wait for gradients that never come)."""

    projector: nn.Module  # every method has one (saved with the encoder for SimCLRv2-style fine-tuning)

    def __init__(self, encoder: ImageModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder.head = nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        return self.encoder.forward_features(x)


class SiameseMethod(SSLMethod):
    """SimSiam and the paper's improved SimCLR: projector f, predictor h, and
    ``L = D(h(f(x1)), f(x2)) / 2 + D(h(f(x2)), f(x1)) / 2`` with stop-gradient on f's outputs."""

    def __init__(self, encoder: ImageModel, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__(encoder)
        self.projector, self.predictor = projector, predictor
        self.loss = NegativeCosineSimilarity()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x1.shape[0]
        z = self.projector(self.features(torch.cat([x1, x2])))  # one pass for both views: (2B, P)
        p = self.predictor(z)
        z1, z2, p1, p2 = z[:b], z[b:], p[:b], p[b:]
        return self.loss(p1, p2, z1, z2), z1.detach()


class SimCLR(SSLMethod):
    """SimCLR: projection head g and NT-Xent over the 2N views (negatives from every rank)."""

    def __init__(self, encoder: ImageModel, head: nn.Module, temperature: float = 0.5) -> None:
        super().__init__(encoder)
        self.projector = head
        self.loss = NTXentLoss(temperature)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x1.shape[0]
        z = self.projector(self.features(torch.cat([x1, x2])))  # (2B, P)
        return self.loss(z[:b], z[b:]), z[:b].detach()


def build_method(
    name: str,
    encoder: ImageModel,
    proj_dim: int = 1024,
    proj_hidden: int = 1024,
    proj_layers: int = 3,
    temperature: float = 0.5,
) -> SSLMethod:
    """``improved-simclr``: projector + the paper's predictor (2 layers, output ``proj_dim``,
    hidden like the projector's layers, final ReLU kept); ``simsiam``: projector + bottleneck
    predictor (``proj_dim / 4``); ``simclr``: SimCLR head (hidden ``proj_hidden``, output
    ``proj_dim``) + NT-Xent."""
    d = encoder.num_features
    if name == "improved-simclr":
        return SiameseMethod(
            encoder,
            ProjectionMLP(d, proj_hidden, proj_dim, proj_layers),
            ImprovedPredictor(proj_dim, proj_hidden, proj_dim),
        )
    if name == "simsiam":
        return SiameseMethod(
            encoder, ProjectionMLP(d, proj_hidden, proj_dim, proj_layers), BottleneckPredictor(proj_dim)
        )
    if name == "simclr":
        return SimCLR(encoder, SimCLRProjectionHead(d, proj_hidden, proj_dim), temperature)
    raise ValueError(f"method {name!r} is not one of {', '.join(METHODS)}")
