"""Self-supervised losses: SimSiam's negative cosine similarity and SimCLR's NT-Xent.

Both follow lightly's modules: small ``nn.Module``s whose defaults are the papers' values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparkvision.spark import distributed as D


class NegativeCosineSimilarity(nn.Module):
    """Symmetric negative cosine similarity with a stop-gradient on the target branch.

    SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021,
    https://arxiv.org/abs/2011.10566), eq. 1-2::

        D(p, z) = - <p / ||p||, stopgrad(z) / ||stopgrad(z)||>
        L = 1/2 D(p1, z2) + 1/2 D(p2, z1)

    ``p`` is a predictor output, ``z`` a projector output of the *other* view. The value is -1
    when each prediction points exactly along its target. Used by SimSiam and by the paper's
    improved SimCLR (same loss, different predictor).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def pair(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``D(p, z)`` averaged over the batch; gradients flow into ``p`` only."""
        if p.shape != z.shape or p.ndim != 2:
            raise ValueError(
                f"expected two (B, D) tensors of the same shape, got {tuple(p.shape)} and {tuple(z.shape)}"
            )
        return -F.cosine_similarity(p, z.detach(), dim=1, eps=self.eps).mean()

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.pair(p1, z2) + 0.5 * self.pair(p2, z1)


class GatherLayer(torch.autograd.Function):
    """``all_gather`` that keeps the gradient for this rank's slice (the others are constants
    produced by other ranks; their gradients are summed back to their owners)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out = [torch.zeros_like(x) for _ in range(D.world_size())]
        torch.distributed.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = torch.stack(grads)
        torch.distributed.all_reduce(g)
        return g[D.rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` on each rank -> ``(world * B, D)``; the identity in a single process."""
    if D.world_size() == 1:
        return x
    return torch.cat(GatherLayer.apply(x), dim=0)


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy over the 2N views of a batch.

    SimCLR (Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of
    Visual Representations", ICML 2020, https://arxiv.org/abs/2002.05709), eq. 1::

        l(i, j) = -log exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t)

    averaged over all 2N anchors, with ``sim`` the cosine similarity. Negatives are the other
    2N - 2 views of the *global* batch: embeddings are gathered from every rank (keeping the
    gradient of the local slice) so the loss equals the single-process loss on the whole batch.
    The default temperature 0.5 is the paper's CIFAR-10 value (0.1 for ImageNet).
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(
                f"expected two (B, D) tensors of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        z1 = F.normalize(gather_with_grad(z1), dim=1)  # (N, D), N = global batch
        z2 = F.normalize(gather_with_grad(z2), dim=1)
        n = z1.shape[0]
        z = torch.cat([z1, z2], dim=0)  # (2N, D)
        sim = z @ z.t() / self.temperature  # (2N, 2N)
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # the positive of i
        return F.cross_entropy(sim, target)


class DistillationLoss(nn.Module):
    """Cross-entropy of the student's tempered softmax against the teacher's (soft labels).

    SimCLRv2 (Chen et al., "Big Self-Supervised Models are Strong Semi-Supervised Learners",
    NeurIPS 2020, https://arxiv.org/abs/2006.10029), eq. 2, after Hinton et al. 2015::

        L = - sum_x sum_y P_T(y | x; tau) log P_S(y | x; tau),  P(y | x; tau) = softmax(logits / tau)

    The teacher's logits are detached: only the student learns. No labels are needed, which is
    what lets the unlabelled pool train the final classifier.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
            raise ValueError(
                f"expected two (B, K) logit tensors of the same shape, got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        target = F.softmax(teacher_logits.detach().float() / self.temperature, dim=1)
        return F.cross_entropy(student_logits.float() / self.temperature, target)


class FixMatchLoss(nn.Module):
    """Confidence-masked pseudo-label loss on strongly augmented views.

    FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
    Confidence", NeurIPS 2020, https://arxiv.org/abs/2001.07685), eq. 4::

        L_u = 1/(mu B) sum_b 1[max q_b >= tau] H(argmax q_b, p(y | A(u_b))),  q_b = p(y | a(u_b))

    ``q`` comes from a weak view ``a(u)`` and is detached (a hard pseudo-label, never a target that
    moves with the gradient); the strong view ``A(u)`` is trained to predict it. The mean is over
    every unlabelled image, confident or not, as in the paper, so the loss grows as the model
    becomes confident on more of the pool. ``last_mask_rate`` (share above ``threshold``) is kept
    for the logs: it is the one number that says whether the unlabelled pool is being used at all.
    """

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__()
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.threshold = threshold
        self.last_mask_rate = 0.0

    def forward(self, strong_logits: torch.Tensor, weak_logits: torch.Tensor) -> torch.Tensor:
        if strong_logits.shape != weak_logits.shape or strong_logits.ndim != 2:
            raise ValueError(
                f"expected two (B, K) logit tensors of the same shape, got "
                f"{tuple(strong_logits.shape)} and {tuple(weak_logits.shape)}"
            )
        conf, pseudo = F.softmax(weak_logits.detach().float(), dim=1).max(1)
        mask = (conf >= self.threshold).float()
        self.last_mask_rate = float(mask.mean())
        return (F.cross_entropy(strong_logits.float(), pseudo, reduction="none") * mask).mean()
