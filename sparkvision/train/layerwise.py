"""Greedy layer-wise CD-k pretraining of a :class:`~sparkvision.models.dbn.DBN`, data-parallel on
the engine's ranks, before the supervised epochs fine-tune the whole stack by backprop.

Hinton & Salakhutdinov 2006 (https://doi.org/10.1126/science.1127647): train the first RBM on the
data, then each next RBM on the hidden probabilities of the ones below, frozen. Here every rank
walks its own shard of the training rows, ``pretrain_epochs`` passes per layer, in the batch plan
the engine's epochs use (:func:`~sparkvision.train.data.epoch_indices`: equal steps on every rank,
the global batch split evenly), on the normalised inputs without augmentation. Each step computes
the CD-k gradient of the layer's RBM on the local batch (:meth:`RBM.cd_gradients`) and averages it
over the ranks with one all-reduce before the optimizer steps, so every rank takes the same step on
the same weights: what one process would do with the global batch.

SGD with momentum 0.5 for the first epoch of each layer and 0.9 after, and an L2 weight cost on
the weights only (Hinton 2010, "A Practical Guide to Training RBMs", sections 9 and 10).

Progress is logged per layer and epoch (rank 0, ``pretrain.jsonl`` in the run's ``OUT``): the
reconstruction error (mean squared difference between the data and the CD chain's last visible
mean, per unit) and the free-energy gap between held-out and training rows (the guide's section
6: a gap that grows means the RBM is overfitting).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from sparkvision.models.dbn import DBN, RBM
from sparkvision.spark import distributed as D
from sparkvision.spark.filestore import write_bytes
from sparkvision.train.data import Shard, epoch_indices
from sparkvision.train.rank import RankTraining
from sparkvision.transforms.preprocess import normalize, to_unit

PRETRAIN_FILE = "pretrain.jsonl"
MOMENTUM_START, MOMENTUM = 0.5, 0.9  # Hinton 2010, section 9
WEIGHT_COST = 2e-4  # Hinton 2010, section 10 (0.01 to 0.00001; on the weights, not the biases)
FREE_ENERGY_ROWS = 512  # rows per rank and split the free-energy gap is taken over
EVAL_BATCH = 512

# Yields one epoch's normalised input batches ``(B, C, H, W)``, given a number that names the epoch.
Batches = Callable[[int], Iterable[torch.Tensor]]
# Yields a fixed few normalised input batches (the rows the free-energy gap is taken over).
Sample = Callable[[], Iterable[torch.Tensor]]


def average_over_ranks(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor averaged over the ranks in one all-reduce (as they are, on one rank)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = D.all_reduce_sum(flat) / D.world_size()
    return [
        part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


def rbm_optimizer(rbm: RBM, lr: float) -> torch.optim.SGD:
    """SGD with momentum; the weight cost on ``W`` only."""
    return torch.optim.SGD(
        [
            {"params": [rbm.W], "weight_decay": WEIGHT_COST},
            {"params": [rbm.v_bias, rbm.h_bias], "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=MOMENTUM_START,
    )


def cd_step(
    rbm: RBM, v0: torch.Tensor, k: int, generator: torch.Generator, optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """One data-parallel CD-k step on the local batch ``v0``; returns this rank's squared
    reconstruction error summed over the batch (for the epoch's log)."""
    g = rbm.cd_gradients(v0, k, generator)
    rbm.W.grad, rbm.v_bias.grad, rbm.h_bias.grad = average_over_ranks([g.W, g.v_bias, g.h_bias])
    optimizer.step()
    return (v0 - g.reconstruction).pow(2).sum().double().cpu()


@torch.no_grad()
def free_energy_sum(dbn: DBN, layer: int, batches: Iterable[torch.Tensor]) -> tuple[float, float]:
    """``(sum of F, rows)`` of RBM ``layer`` over the input ``batches``, summed over the ranks."""
    total = torch.zeros(2, dtype=torch.float64)
    for x in batches:
        v = dbn.up(x, layer)
        total += torch.tensor(
            [float(dbn.stack[layer].free_energy(v).double().sum()), len(v)], dtype=torch.float64
        )
    total = D.all_reduce_sum(total)
    return float(total[0]), float(total[1])


def pretrain_dbn(
    dbn: DBN,
    batches: Batches,
    generator: torch.Generator,
    train_sample: Sample = list,
    held_out: Sample = list,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Pretrain ``dbn``'s RBMs bottom-up, ``dbn.pretrain_epochs`` passes each over ``batches``;
    return one log row per layer and epoch (also handed to ``on_epoch`` as they come).

    Each RBM's data is its input pushed through the trained layers below it (mean-field hidden
    probabilities, recomputed per batch: cheap beside the CD chain). ``train_sample`` and
    ``held_out`` give a few input batches of training and held-out rows for the free-energy gap
    (``None`` when either has no row on any rank). Every rank must call this, with the same
    number of steps per epoch.
    """
    log: list[dict[str, Any]] = []
    for layer, rbm in enumerate(dbn.stack):
        optimizer = rbm_optimizer(rbm, dbn.pretrain_lr)
        for epoch in range(dbn.pretrain_epochs):
            if epoch == 1:
                for group in optimizer.param_groups:
                    group["momentum"] = MOMENTUM
            t0 = time.perf_counter()
            sums = torch.zeros(2, dtype=torch.float64)  # squared error, values
            for x in batches(layer * dbn.pretrain_epochs + epoch):
                with torch.no_grad():
                    v0 = dbn.up(x, layer)  # (B, this RBM's visible units)
                sums[0] += cd_step(rbm, v0, dbn.cd_k, generator, optimizer)
                sums[1] += v0.numel()
            sums = D.all_reduce_sum(sums)
            train_f, n_train = free_energy_sum(dbn, layer, train_sample())
            held_f, n_held = free_energy_sum(dbn, layer, held_out())
            gap = held_f / n_held - train_f / n_train if n_train and n_held else None
            row = {
                "layer": layer + 1,
                "epoch": epoch + 1,
                "recon_error": round(float(sums[0] / sums[1].clamp_min(1)), 6),
                "free_energy_gap": None if gap is None else round(gap, 5),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            log.append(row)
            if on_epoch is not None:
                on_epoch(log)
    return log


def first_rows(shard: Shard, n: int, batch: int = EVAL_BATCH) -> list[torch.Tensor]:
    """Up to ``n`` of ``shard``'s first rows as uint8 batches (a fixed sample, the same each epoch)."""
    rows = shard.head(min(n, len(shard)))
    return [rows.images[i : i + batch] for i in range(0, len(rows), batch)]


def pretrain_rank(rank: RankTraining, held_out: Shard | None) -> list[dict[str, Any]]:
    """The engine's glue: pretrain ``rank.module`` (a DBN) on ``rank.rows`` with the skeleton's
    batch plan, device and normalisation; rank 0 rewrites ``pretrain.jsonl`` after every epoch.

    The generator is seeded by the run's seed and the rank, so each rank draws its own samples and
    a rerun draws the same ones."""
    dbn = rank.module
    if not isinstance(dbn, DBN):
        raise TypeError(f"layer-wise pretraining needs a DBN, got {type(dbn).__name__}")
    cfg, ctx, device = rank.cfg, rank.ctx, rank.device
    local_batch = cfg.batch_size // ctx.world_size

    def prepared(images: torch.Tensor) -> torch.Tensor:
        return normalize(
            to_unit(images.to(device, non_blocking=True)), rank.mean, rank.std, rank.channels_last
        )

    def batches(number: int) -> Iterator[torch.Tensor]:
        # Negative epoch numbers: orders of their own, apart from the supervised epochs' (0, 1, ...).
        idx = epoch_indices(len(rank.rows), rank.steps, local_batch, cfg.seed, -1 - number, ctx.rank)
        rank.rows.plan(idx)
        for b in idx:
            yield prepared(rank.rows.images[b])

    def write_log(rows: list[dict[str, Any]]) -> None:
        if ctx.is_main:
            write_bytes(rank.store, PRETRAIN_FILE, "".join(json.dumps(r) + "\n" for r in rows).encode())

    generator = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + 7_919 + ctx.rank)
    sample = first_rows(rank.rows, FREE_ENERGY_ROWS)  # uint8, normalised as they are used
    held = first_rows(held_out, FREE_ENERGY_ROWS) if held_out is not None else []
    return pretrain_dbn(
        dbn,
        batches,
        generator,
        lambda: map(prepared, sample),
        lambda: map(prepared, held),
        write_log,
    )
