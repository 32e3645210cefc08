"""A rank's shard of the image table, decoded once into memory, and the per-epoch step plan.

Data arrives through Spark (Arrow batches of the image table's rows), is decoded on the worker
once and kept as a uint8 tensor, so each epoch reads memory like a plain PyTorch loop over
in-memory tensors would: no per-epoch I/O, no Python per-sample work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import torch

from sparkvision.data.images import RejectError
from sparkvision.spark import distributed as D
from sparkvision.transforms.preprocess import decode_image


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
    batches: Iterator[pa.RecordBatch],
    channels: int,
    size: tuple[int, int],
    available_bytes: int | None = -1,
) -> tuple[Shard, list[str]]:
    """Decode ``image``/``label``/``split`` columns into per-split shards' raw material.

    Returns one Shard of every decodable row plus the split name of each row (same order).
    Undecodable rows are counted, not fatal (ingestion already rejected most bad input).

    Two passes, so that the decoded pixels exist once: the first keeps the (compressed) encoded
    bytes and counts the rows, the second decodes each image straight into one preallocated
    tensor. Stacking per-image arrays and then permuting them to (N, C, H, W) held three copies at
    the peak. Between the passes the decoded size is checked against the memory this worker has
    (``available_bytes``; -1 reads it from the OS, None skips the check), so an oversized shard is
    a clear error naming what to change, not an executor killed by the OOM killer.
    """
    h, w = size
    encoded: list[bytes] = []
    labels: list[int] = []
    splits: list[str] = []
    for batch in batches:
        d = batch.to_pydict()
        encoded.extend(d["image"])
        labels.extend(-1 if label is None else int(label) for label in d["label"])
        splits.extend(d["split"])
    need = len(encoded) * channels * h * w
    if available_bytes == -1:
        available_bytes = available_memory_bytes()
    check_shard_fits(need, available_bytes, len(encoded), (channels, h, w))
    images = torch.empty((len(encoded), channels, h, w), dtype=torch.uint8)
    out = images.numpy()  # shares memory with ``images``
    kept = 0  # good rows are packed to the front, so dropping bad ones needs no copy
    for i, data in enumerate(encoded):
        try:
            out[kept] = decode_image(data, channels, (h, w))
        except (RejectError, TypeError):  # TypeError: a null image
            continue
        finally:
            encoded[i] = b""  # the encoded copy is no longer needed
        labels[kept], splits[kept] = labels[i], splits[i]
        kept += 1
    bad = len(encoded) - kept
    return Shard(images[:kept], torch.tensor(labels[:kept], dtype=torch.int64), bad), splits[:kept]


def available_memory_bytes() -> int | None:
    """Memory this process may still use: the smaller of the machine's ``MemAvailable`` and the
    room left under a cgroup v2/v1 limit (containers, YARN, Kubernetes). None where neither can be
    read (not Linux): the check is then skipped."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge v1 value: no limit
            found.append(max(0, int(limit) - usage))
        break
    return min(found) if found else None


def check_shard_fits(need: int, available: int | None, rows: int, shape: tuple[int, int, int]) -> None:
    """Refuse a decoded shard larger than the memory left, with what to change."""
    if available is None or need <= available:
        return
    c, h, w = shape
    raise ValueError(
        f"this rank's shard of {rows:,} images at {c}x{h}x{w} needs {need / 2**30:.2f} GiB decoded, but only "
        f"{available / 2**30:.2f} GiB of memory is available on its worker: use more workers, a smaller "
        "image_size, a subset of the table, or executors with more memory"
    )


def steps_per_epoch(global_count: int, global_batch: int) -> int:
    """Every rank runs this many steps, whatever its shard size (no rank waits on another)."""
    return max(1, math.ceil(global_count / global_batch))


def epoch_indices(
    n_local: int, steps: int, local_batch: int, seed: int, epoch: int, rank: int
) -> torch.Tensor:
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
