"""What to watch while pretraining: a kNN accuracy monitor and the collapse signal.

* kNN accuracy (Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", CVPR 2018, https://arxiv.org/abs/1805.01978): cosine similarity of each
  labelled validation feature against a labelled bank; the ``k`` nearest vote with weight
  ``exp(sim / t)``. No training, so it can run every epoch.
* Per-dimension std of the L2-normalised outputs (Chen & He 2021, sec. 4.1, fig. 2): about
  ``1/sqrt(d)`` for outputs spread over the sphere, 0 when every image maps to the same point.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels ``(Q,)`` of ``queries (Q, D)`` from ``bank (N, D)`` with labels ``(N,)``."""
    if bank.shape[0] == 0:
        raise ValueError("kNN monitor: the bank is empty")
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for i in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[i : i + chunk].float(), dim=1)
        sim, idx = (q @ bank.t()).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    pred = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return float((pred == query_labels).float().mean()) if len(query_labels) else float("nan")


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension std of ``z / ||z||`` (``z`` is ``(B, d)``)."""
    return float(F.normalize(z.float(), dim=1).std(dim=0).mean())


def collapse_warning(std: float, dim: int, ratio: float = 0.2) -> str | None:
    """A message when ``std`` is below ``ratio / sqrt(dim)`` (healthy outputs give ~1/sqrt(dim))."""
    healthy = 1 / math.sqrt(dim)
    if std < ratio * healthy:
        return (
            f"possible collapse: std of normalised outputs {std:.4f} is below {ratio:g} x 1/sqrt({dim}) = "
            f"{ratio * healthy:.4f}; lower the learning rate or check the predictor/augmentations"
        )
    return None
