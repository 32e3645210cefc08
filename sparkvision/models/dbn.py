"""A deep belief network: stacked restricted Boltzmann machines, pretrained greedily layer by layer
with contrastive divergence, then fine-tuned as one sigmoid network with a softmax on top.

Hinton & Salakhutdinov 2006, "Reducing the dimensionality of data with neural networks",
Science 313 (https://doi.org/10.1126/science.1127647): the greedy layer-wise recipe, each RBM
trained on the hidden probabilities of the one below, then backprop through the whole stack.
Hinton 2010, "A Practical Guide to Training Restricted Boltzmann Machines", UTML TR 2010-003
(https://www.cs.toronto.edu/~hinton/absps/guideTR.pdf): the CD-k statistics used here (section 3),
the initial weights N(0, 0.01^2) (section 8) and unit-variance Gaussian visible units on
standardised data (section 13.2).

This module is the model only. The pretraining loop, data-parallel on our engine, is
:mod:`sparkvision.train.layerwise`; fine-tuning is the engine's ordinary supervised epochs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal, NamedTuple, cast

import torch
from torch import nn
from torch.nn import functional as F

from sparkvision.models.registry import ImageModel, register_model

Visible = Literal["bernoulli", "gaussian"]
VISIBLE_KINDS: tuple[str, ...] = ("auto", "bernoulli", "gaussian")
# Which layer inputs pretraining holds in rank memory instead of recomputing them every batch
# (:mod:`sparkvision.train.layerwise`): as RC's planner chooses under the budget, none, or all.
CACHE_LAYERS: tuple[str, ...] = ("auto", "none", "all")
INIT_STD = 0.01  # Hinton 2010, section 8: small random weights N(0, 0.01^2), zero biases


def bernoulli(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary draws with probabilities ``p``: uniform draws of ``generator`` below ``p``, spelt
    out (not ``torch.bernoulli``) so a test can reproduce them from the same seed."""
    return (torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) < p).to(p.dtype)


class CDGradients(NamedTuple):
    """CD-k gradient estimates of a loss to minimise (negative log-likelihood), shaped like the
    parameters they belong to, and the chain's last visible mean (for the reconstruction error)."""

    W: torch.Tensor  # (H, V)
    v_bias: torch.Tensor  # (V,)
    h_bias: torch.Tensor  # (H,)
    reconstruction: torch.Tensor  # (B, V)


class RBM(nn.Module):
    """A restricted Boltzmann machine with binary hidden units and Bernoulli or Gaussian visibles.

    Energies (Hinton 2010, sections 1 and 13.2; ``W`` is ``(hidden, visible)`` like ``nn.Linear``):

    - Bernoulli visibles: ``E(v, h) = -b.v - c.h - h.W v``
    - Gaussian visibles of unit variance: ``E(v, h) = |v - b|^2 / 2 - c.h - h.W v``. The variance
      is fixed at 1, which fits inputs standardised to zero mean and unit variance (the guide's
      advice: learning the variance is hard, standardising the data is easy).

    Either way ``p(h_j = 1 | v) = sigmoid(c_j + W_j.v)``; ``p(v_i = 1 | h) = sigmoid(b_i + h.W_i)``
    for Bernoulli visibles, ``v_i | h ~ N(b_i + h.W_i, 1)`` for Gaussian ones.

    The visible bias belongs to the generative model only: the discriminative network built on the
    RBM (:class:`DBN`) never uses it, so it does not require grad (DDP would otherwise wait for a
    gradient that never comes); pretraining steps it explicitly.
    """

    def __init__(self, n_visible: int, n_hidden: int, visible: Visible = "bernoulli") -> None:
        super().__init__()
        if visible not in ("bernoulli", "gaussian"):
            raise ValueError(f"visible must be 'bernoulli' or 'gaussian', got {visible!r}")
        if n_visible < 1 or n_hidden < 1:
            raise ValueError(
                f"an RBM needs at least one visible and one hidden unit, got {n_visible}x{n_hidden}"
            )
        self.visible: Visible = visible
        self.W = nn.Parameter(torch.randn(n_hidden, n_visible) * INIT_STD)
        self.v_bias = nn.Parameter(torch.zeros(n_visible), requires_grad=False)
        self.h_bias = nn.Parameter(torch.zeros(n_hidden))

    @property
    def n_visible(self) -> int:
        return self.W.shape[1]

    @property
    def n_hidden(self) -> int:
        return self.W.shape[0]

    def hidden_probs(self, v: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, H)
        """``p(h = 1 | v)``: also the DBN layer's mean-field activation."""
        return torch.sigmoid(F.linear(v, self.W, self.h_bias))

    def visible_mean(self, h: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, V)
        """``E[v | h]``: the probabilities of Bernoulli visibles, the mean of Gaussian ones."""
        a = F.linear(h, self.W.t(), self.v_bias)
        return torch.sigmoid(a) if self.visible == "bernoulli" else a

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
        """``F(v) = -log sum_h exp(-E(v, h))``: ``-b.v - sum_j softplus(c_j + W_j.v)`` for
        Bernoulli visibles, ``|v - b|^2 / 2 - sum_j softplus(c_j + W_j.v)`` for Gaussian ones."""
        hidden_term = F.softplus(F.linear(v, self.W, self.h_bias)).sum(1)
        if self.visible == "bernoulli":
            return -(v @ self.v_bias) - hidden_term
        return 0.5 * (v - self.v_bias).pow(2).sum(1) - hidden_term

    def sample_h(
        self, v: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p(h = 1 | v), a binary sample of h)``. The sample compares uniform draws of
        ``generator`` with the probabilities, so a test can reproduce it draw for draw."""
        p = self.hidden_probs(v)
        return p, bernoulli(p, generator)

    def sample_v(
        self, h: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[v | h], a sample of v)``: Bernoulli draws, or the mean plus unit Gaussian noise."""
        mean = self.visible_mean(h)
        if self.visible == "bernoulli":
            return mean, bernoulli(mean, generator)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean, mean + noise

    @torch.no_grad()
    def cd_gradients(
        self, v0: torch.Tensor, k: int = 1, generator: torch.Generator | None = None
    ) -> CDGradients:
        """CD-k estimates of the gradient of ``-log p(v0)`` (mean over the batch), to put in
        ``.grad`` and step with a torch optimizer: minus (data statistics - model statistics).

        As Hinton 2010 (section 3) recommends: the hidden units are sampled (binary) wherever they
        drive a reconstruction; the reconstructions are visible means, not samples; and the
        statistics use hidden probabilities, not samples (less noise, same expectation):

            h ~ p(h | v0);  k times: v = E[v | h], p_k = p(h | v), h ~ p_k  (the last not drawn)
            dW = -(p_0^T v0 - p_k^T v_k) / B,  db = -mean(v0 - v_k),  dc = -mean(p_0 - p_k)

        For Gaussian visibles ``dE/db = -(v - b)``, whose difference between the phases is the same
        ``v0 - v_k``, so one set of equations serves both kinds.
        """
        if k < 1:
            raise ValueError(f"cd_k must be >= 1, got {k}")
        p0, h = self.sample_h(v0, generator)
        v, pk = v0, p0
        for step in range(k):
            v = self.visible_mean(h)
            pk = self.hidden_probs(v)
            if step < k - 1:
                h = bernoulli(pk, generator)
        b = v0.shape[0]
        return CDGradients(
            W=-(p0.t() @ v0 - pk.t() @ v) / b,
            v_bias=-(v0 - v).mean(0),
            h_bias=-(p0 - pk).mean(0),
            reconstruction=v,
        )


class DBN(ImageModel):
    """Stacked RBMs as a feed-forward network: each layer ``sigmoid(W x + c)`` (the RBM's hidden
    probabilities, i.e. the mean-field up-pass), then a linear head trained with softmax
    cross-entropy by the engine.

    ``visible`` is the first RBM's visible kind; every higher RBM has Bernoulli visibles (the
    probabilities of the layer below). ``auto`` is ``gaussian``: the engine feeds the model inputs
    standardised by the table's per-channel mean and std. The pretraining settings
    (``pretrain_epochs`` per layer, ``cd_k``, ``pretrain_lr``, and ``cache_layers``: which layer
    inputs to hold in rank memory rather than recompute every batch) are read by
    :mod:`sparkvision.train.layerwise`; 0 pretraining epochs is plain backprop from random weights.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: Sequence[int] = (500, 500),
        visible: str = "auto",
        pretrain_epochs: int = 1,
        cd_k: int = 1,
        pretrain_lr: float = 0.01,
        cache_layers: str = "auto",
    ) -> None:
        super().__init__()
        widths = list(hidden)
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise ValueError(f"hidden must be a non-empty list of positive layer widths, got {hidden!r}")
        if visible not in VISIBLE_KINDS:
            raise ValueError(f"visible must be one of {', '.join(VISIBLE_KINDS)}, got {visible!r}")
        if not isinstance(pretrain_epochs, int) or pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be an integer >= 0, got {pretrain_epochs!r}")
        if not isinstance(cd_k, int) or cd_k < 1:
            raise ValueError(f"cd_k must be an integer >= 1, got {cd_k!r}")
        if not pretrain_lr > 0:
            raise ValueError(f"pretrain_lr must be > 0, got {pretrain_lr!r}")
        if cache_layers not in CACHE_LAYERS:
            raise ValueError(f"cache_layers must be one of {', '.join(CACHE_LAYERS)}, got {cache_layers!r}")
        first: Visible = "bernoulli" if visible == "bernoulli" else "gaussian"
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.pretrain_epochs, self.cd_k, self.pretrain_lr = pretrain_epochs, cd_k, float(pretrain_lr)
        self.cache_layers = cache_layers
        sizes = [in_channels * image_size * image_size, *widths]
        self.rbms = nn.ModuleList(
            RBM(a, b, first if i == 0 else "bernoulli") for i, (a, b) in enumerate(itertools.pairwise(sizes))
        )
        self.num_features = widths[-1]
        self.head = nn.Linear(widths[-1], num_classes)
        # ``visible`` resolved, so a later change of what ``auto`` means cannot change a saved model.
        self.arch = {"hidden": widths, "visible": first, "image_size": image_size}

    @property
    def stack(self) -> list[RBM]:
        """The RBMs bottom-up (typed: ``self.rbms`` holds them as plain modules)."""
        return [cast(RBM, m) for m in self.rbms]

    def up(self, x: torch.Tensor, layers: int) -> torch.Tensor:  # (B, C, H, W) -> (B, hidden[layers-1])
        """The input through the first ``layers`` RBMs (mean-field): the data of RBM ``layers``."""
        x = torch.flatten(x, 1)  # (B, C*H*W), whatever the memory format
        stack = self.stack
        if not torch.jit.is_tracing() and x.shape[1] != stack[0].n_visible:
            raise ValueError(
                f"the DBN was built for {self.in_channels}x{self.image_size}x{self.image_size} inputs "
                f"({stack[0].n_visible} values), got {x.shape[1]} values per image"
            )
        for rbm in stack[:layers]:
            x = rbm.hidden_probs(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, hidden[-1])
        return self.up(x, len(self.rbms))


@register_model("dbn")
def dbn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kw) -> DBN:
    return DBN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)
