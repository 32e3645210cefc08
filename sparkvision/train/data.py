"""A rank's shard of the image table, decoded once into memory, and the per-epoch step plan.

Data arrives through Spark (Arrow batches of the image table's rows), is decoded on the worker
once and kept as a uint8 tensor, so each epoch reads memory like a plain PyTorch loop over
in-memory tensors would: no per-epoch I/O, no Python per-sample work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .. import distributed as D
from ..images import RejectError, decode_to_array


@dataclass
class Shard:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 when unlabelled
    bad_rows: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, mask: torch.Tensor) -> Shard:
        return Shard(self.images[mask], self.labels[mask], 0)


def decode_shard(
    batches: Iterator[pa.RecordBatch], channels: int, size: tuple[int, int]
) -> tuple[Shard, list[str]]:
    """Decode ``image``/``label``/``split`` columns into per-split shards' raw material.

    Returns one Shard of every decodable row plus the split name of each row (same order).
    Undecodable rows are counted, not fatal (ingestion already rejected most bad input).
    """
    h, w = size
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    splits: list[str] = []
    bad = 0
    for batch in batches:
        d = batch.to_pydict()
        for data, label, split in zip(d["image"], d["label"], d["split"], strict=True):
            try:
                arr = decode_to_array(data, channels, (h, w))
            except RejectError:
                bad += 1
                continue
            arrays.append(arr)
            labels.append(-1 if label is None else int(label))
            splits.append(split)
    if arrays:
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    else:
        images = torch.empty((0, channels, h, w), dtype=torch.uint8)
    return Shard(images, torch.tensor(labels, dtype=torch.int64), bad), splits


def steps_per_epoch(global_count: int, global_batch: int) -> int:
    """Every rank runs this many steps, whatever its shard size (no rank waits on another)."""
    return max(1, math.ceil(global_count / global_batch))


def epoch_indices(n_local: int, steps: int, local_batch: int, seed: int, epoch: int, rank: int) -> torch.Tensor:
    """``(steps, local_batch)`` indices into the local shard: a fresh permutation each epoch,
    repeated (each repetition freshly permuted) when the shard is smaller than the epoch needs."""
    if n_local <= 0:
        raise ValueError("empty shard")
    g = torch.Generator().manual_seed(hash((seed, epoch, rank)) & 0x7FFFFFFF)
    need = steps * local_batch
    reps = math.ceil(need / n_local)
    idx = torch.cat([torch.randperm(n_local, generator=g) for _ in range(reps)])[:need]
    return idx.view(steps, local_batch)


def split_mask(splits: list[str], name: str | None) -> torch.Tensor:
    """Boolean mask of the rows whose split is ``name`` (none when ``name`` is None)."""
    return torch.tensor([s == name for s in splits], dtype=torch.bool)


def pixel_stats(images: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of uint8 ``(N, C, H, W)`` pixels scaled to [0, 1], over all ranks.

    Every rank must call it (an all-reduce); the result is the model's preprocessing spec.
    """
    px = images.to(torch.float64).div_(255)
    stats = torch.cat([px.sum(dim=(0, 2, 3)), (px * px).sum(dim=(0, 2, 3)), torch.tensor([px[:, 0].numel()])])
    del px
    stats = D.all_reduce_sum(stats)
    mean = stats[:channels] / stats[-1]
    std = (stats[channels : 2 * channels] / stats[-1] - mean**2).clamp_min(1e-12).sqrt()
    return mean, std
