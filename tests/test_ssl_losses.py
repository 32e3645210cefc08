"""SSL losses against their equations, written out directly; heads' shapes."""

from __future__ import annotations

import math

import pytest
import torch

from sparkvision.ssl.heads import BottleneckPredictor, ImprovedPredictor, ProjectionMLP, SimCLRProjectionHead
from sparkvision.ssl.losses import NegativeCosineSimilarity, NTXentLoss


def _d(p, z):  # D(p, z) = -<p/||p||, z/||z||>, averaged over the batch
    return -torch.stack([(p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(len(p))]).mean()


def test_negative_cosine_matches_equation_and_is_symmetric():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 5) for _ in range(4))
    loss = NegativeCosineSimilarity()
    expected = 0.5 * _d(p1, z2) + 0.5 * _d(p2, z1)
    assert torch.allclose(loss(p1, p2, z1, z2), expected, atol=1e-6)
    assert torch.allclose(loss(p1, p2, z1, z2), loss(p2, p1, z2, z1), atol=1e-6)  # swapping the views


def test_negative_cosine_is_minus_one_for_identical_directions():
    x = torch.randn(4, 8)
    assert torch.allclose(NegativeCosineSimilarity()(x, x, x, x), torch.tensor(-1.0), atol=1e-6)
    assert torch.allclose(NegativeCosineSimilarity()(x, x, 3 * x, 3 * x), torch.tensor(-1.0), atol=1e-6)


def test_stop_gradient_on_target_branch():
    p1, p2, z1, z2 = (torch.randn(4, 8, requires_grad=True) for _ in range(4))
    NegativeCosineSimilarity()(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_stop_gradient_through_a_shared_projector():
    """As in SimSiam: z = f(x), p = h(z); the gradient through z reaches f only via p."""
    f = torch.nn.Linear(5, 5)
    x1, x2 = torch.randn(4, 5), torch.randn(4, 5)
    z1, z2 = f(x1), f(x2)
    z1.retain_grad(), z2.retain_grad()
    p1, p2 = z1 * 2, z2 * 2  # a stand-in predictor
    NegativeCosineSimilarity()(p1, p2, z1, z2).backward()
    g1, g2 = z1.grad.clone(), z2.grad.clone()
    # The only gradient z gets is the one through its own prediction p (d p/d z = 2).
    direct = torch.autograd.grad(0.5 * _d(z1 * 2, z2.detach()) + 0.5 * _d(z2 * 2, z1.detach()), [z1, z2])
    assert torch.allclose(g1, direct[0], atol=1e-6) and torch.allclose(g2, direct[1], atol=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        NegativeCosineSimilarity()(torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)


def _ntxent_explicit(z1, z2, t):
    """Eq. 1 of SimCLR with a loop over the 2N anchors."""
    z = torch.cat([z1, z2])
    n2 = len(z)
    n = n2 // 2
    sim = lambda a, b: (z[a] @ z[b]) / (z[a].norm() * z[b].norm())  # noqa: E731
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(math.exp(float(sim(i, k)) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(sim(i, j)) / t) / denom)
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_ntxent_matches_explicit_formula(t):
    torch.manual_seed(1)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    assert float(NTXentLoss(t)(z1, z2)) == pytest.approx(_ntxent_explicit(z1, z2, t), rel=1e-5)
    assert float(NTXentLoss(t)(z1, z2)) == pytest.approx(float(NTXentLoss(t)(z2, z1)), rel=1e-6)  # symmetric


def test_ntxent_lowest_for_aligned_pairs():
    torch.manual_seed(2)
    z = torch.randn(8, 16)
    assert NTXentLoss(0.5)(z, z) < NTXentLoss(0.5)(z, torch.randn(8, 16))


def test_heads_shapes_and_structure():
    x = torch.randn(4, 32)
    proj = ProjectionMLP(32, hidden_dim=64, out_dim=48, num_layers=3)
    assert proj(x).shape == (4, 48)
    assert isinstance(proj.net[-1], torch.nn.BatchNorm1d)  # BN on the output fc, no ReLU
    pred = ImprovedPredictor(48, 64, 48)
    assert pred(proj(x)).shape == (4, 48)
    assert isinstance(pred.net[-1], torch.nn.ReLU)  # the paper keeps the final ReLU
    assert (pred(proj(x)) >= 0).all()
    bott = BottleneckPredictor(48)
    assert bott.net[0].out_features == 12 and isinstance(
        bott.net[-1], torch.nn.Linear
    )  # width / 4, plain output
    assert SimCLRProjectionHead(32, 64, 16)(x).shape == (4, 16)
    assert ImprovedPredictor().out_dim == 1024 and ProjectionMLP(512).out_dim == 1024  # the paper's 1024
