"""A rank's shard of the image table, and the per-epoch step plan.

Data arrives through Spark (Arrow batches of the image table's rows). :func:`load_shard` keeps
it in one of two shard caches behind the same interface (``Shard.images[b]``, slices,
``subset(mask)``, ``len``), so the methods' code does not know which:

- ``memory``: decoded once into a uint8 ``(N, C, H, W)`` tensor, so each epoch reads memory like
  a plain PyTorch loop over in-memory tensors would: no per-epoch I/O, no Python per-sample work.
  A shard larger than the worker's memory is a clear error.
- ``stream``: the rows stay encoded, as the table holds them (a local file, or memory when
  small), and each batch decodes in a thread pool ahead of the step
  (:mod:`sparkvision.train.store`): a rank's memory is bounded by batch and prefetch sizes.
- ``auto`` (the default): ``memory`` when the decoded shard takes under half of the memory
  available (``AUTO_SHARE``), else ``stream``; every rank takes the same choice.

Both use the same row indices and the same decoder, so for a fixed seed they give the same
batches; see docs/training.md for the two ways they can differ (pixel statistics of a shard
larger than ``STATS_SAMPLE`` rows, and a row whose header reads but whose body does not).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sparkvision.data.images import PixelDtype, RejectError
from sparkvision.fields import CacheMode
from sparkvision.models.modeldir import Resize
from sparkvision.spark import distributed as D
from sparkvision.train.store import (
    SPILL_BYTES,
    BatchDecoder,
    EncodedRows,
    RowStore,
    StreamImages,
    header_ok,
    local_dirs,
    roomiest,
)
from sparkvision.transforms.preprocess import decode_image

# ``auto`` keeps the decoded shard in memory when it takes under this share of the available memory.
AUTO_SHARE = 0.5
# Rows per rank the stream cache's pixel statistics are taken from (all rows of a smaller shard).
STATS_SAMPLE = 4096
# Decoded bytes per chunk of the pixel statistics (a histogram per chunk: no float copy at all).
STATS_CHUNK_BYTES = 16 * 2**20


@dataclass
class Shard:
    images: torch.Tensor | StreamImages  # (N, C, H, W) uint8, decoded (memory) or on demand (stream)
    labels: torch.Tensor  # (N,) int64; -1 when unlabelled
    bad_rows: int = 0
    # The ``extra_columns`` a method asked :func:`load_shard` for (e.g. a detection table's
    # ``boxes``), row for row with ``images``: compact Arrow arrays, never Python objects per row.
    extra: dict[str, pa.Array] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, mask: torch.Tensor) -> Shard:
        images = self.images[mask] if isinstance(self.images, torch.Tensor) else self.images.subset(mask)
        keep = pa.array(mask.numpy())
        return Shard(images, self.labels[mask], 0, {k: v.filter(keep) for k, v in self.extra.items()})

    def head(self, n: int) -> Shard:
        """The first ``n`` rows (a view: nothing is copied or decoded)."""
        images = self.images[:n] if isinstance(self.images, torch.Tensor) else self.images.head(n)
        return Shard(images, self.labels[:n], 0, {k: v.slice(0, n) for k, v in self.extra.items()})

    def plan(self, idx: torch.Tensor, first: int = 0) -> None:
        """This epoch's ``(steps, local_batch)`` indices, walked from step ``first``: the stream
        cache decodes ahead along them."""
        if isinstance(self.images, StreamImages):
            self.images.plan(idx, first)

    @property
    def cache(self) -> str:
        return "stream" if isinstance(self.images, StreamImages) else "memory"

    @property
    def store(self) -> RowStore | None:
        """The stream cache's store (threads, local file) to close at the end; None in memory."""
        return self.images.store if isinstance(self.images, StreamImages) else None


def load_shard(
    batches: Iterator[pa.RecordBatch],
    channels: int,
    size: tuple[int, int],
    cache: CacheMode = "auto",
    threads: int = 1,
    available_bytes: int | None = -1,
    spill_dir: str | None = None,
    spill_bytes: int = SPILL_BYTES,
    extra_columns: tuple[str, ...] = (),
    pixel_dtype: PixelDtype = "uint8",
    resize: Resize = "stretch",
) -> tuple[Shard, list[str]]:
    """Keep the ``image``/``label``/``split`` columns in the ``cache`` the shard's size allows,
    and the ``extra_columns`` as they came (``Shard.extra``, the same rows kept).

    Returns one Shard of every usable row plus the split name of each row (same order).
    Unusable rows are counted (``bad_rows``), not fatal (ingestion already rejected most bad
    input): ``memory`` drops every row that fails to decode; ``stream`` drops every row whose
    header fails the decoder's checks (read once at load) and decodes a row whose body then fails
    as zeros, counted in the store.

    The encoded bytes are gathered first (copied from the Arrow buffers, spilled to a local file
    past ``spill_bytes`` unless the cache is ``memory``) and counted; the decoded size is then
    compared with the memory this worker has (``available_bytes``; -1 reads it from the OS, None
    skips the check). ``memory`` then decodes each image straight into one preallocated tensor,
    releasing the encoded bytes as it goes; a shard that does not fit is a clear error naming
    what to change, not an executor killed by the OOM killer. ``threads`` decode for ``stream``.
    ``pixel_dtype="float32"`` (a float table) keeps float32 rows instead of uint8.
    ``resize``: how a row of another shape becomes ``size``
    (:func:`~sparkvision.transforms.preprocess.fit_size`). With "crop" each row is kept as its
    centre crop at ``size`` (the evaluation view), and training's random resized crops are cut
    from that (:class:`~sparkvision.train.augment.BatchAugment`): a fixed-size store cannot keep
    a row's full shorter-side view, whose length varies with its aspect ratio.
    """
    c, (h, w) = channels, size
    rows = EncodedRows(spill_dir or roomiest(local_dirs()), None if cache == "memory" else spill_bytes)
    try:
        labels, codes, names, extra = read_columns(batches, rows, extra_columns)
        n = len(rows)
        need = n * c * h * w * np.dtype(pixel_dtype).itemsize
        if available_bytes == -1:
            available_bytes = available_memory_bytes()
        mode = cache
        images: torch.Tensor | StreamImages
        if cache == "auto":
            roomy = available_bytes is None or need <= AUTO_SHARE * available_bytes
            votes = D.all_reduce_sum(torch.tensor([0.0 if roomy else 1.0], dtype=torch.float64))
            mode = "memory" if votes[0] == 0 else "stream"  # every rank takes the same choice
        if mode == "memory":
            check_shard_fits(need, available_bytes, n, (c, h, w))
            images, keep = decode_all(rows, c, (h, w), pixel_dtype, resize)
        else:
            keep = np.array([header_ok(rows.read(i)) for i in range(n)], dtype=bool)
            store = RowStore(rows, BatchDecoder(rows, c, (h, w), threads, pixel_dtype, resize))
            images = StreamImages(store, np.flatnonzero(keep))
    except BaseException:
        rows.close()
        raise
    kept = labels[keep]
    names_or_none: list[Any] = [*names, None]  # code -1: a null split
    splits: list[str] = [names_or_none[k] for k in codes[keep].tolist()]
    kept_extra = {k: v.filter(pa.array(keep)) for k, v in extra.items()}
    return Shard(images, torch.from_numpy(kept), n - len(kept), kept_extra), splits


def read_columns(
    batches: Iterable[pa.RecordBatch], rows: EncodedRows, extra_columns: tuple[str, ...] = ()
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, pa.Array]]:
    """Feed each batch's ``image`` column to ``rows``; return every row's label (-1 for null),
    split code and the split names (a code per row, not a string: memory that grows by bytes per row),
    and each of ``extra_columns`` as one Arrow array."""
    labels: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    names: dict[str, int] = {}
    extra: dict[str, list[pa.Array]] = {k: [] for k in extra_columns}
    for batch in batches:
        rows.append(batch.column("image"))
        for k, chunks in extra.items():
            chunks.append(batch.column(k))
        labels.append(pc.fill_null(batch.column("label"), -1).to_numpy(zero_copy_only=False).astype(np.int64))
        enc = batch.column("split").dictionary_encode()
        lut = np.array([names.setdefault(v, len(names)) for v in enc.dictionary.to_pylist()] + [-1])
        codes.append(lut[pc.fill_null(enc.indices, len(lut) - 1).to_numpy(zero_copy_only=False)])
    rows.finish()
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.concatenate(labels) if labels else empty,
        np.concatenate(codes).astype(np.int64) if codes else empty,
        list(names),
        {k: pa.chunked_array(c).combine_chunks() for k, c in extra.items() if c},
    )


def decode_all(
    rows: EncodedRows,
    channels: int,
    size: tuple[int, int],
    pixel_dtype: PixelDtype = "uint8",
    resize: Resize = "stretch",
) -> tuple[torch.Tensor, np.ndarray]:
    """Decode every row into one preallocated tensor, good rows packed to the front (dropping a
    bad one needs no copy); returns the decoded rows and the mask of the rows kept."""
    dtype = torch.float32 if pixel_dtype == "float32" else torch.uint8
    images = torch.empty((len(rows), channels, *size), dtype=dtype)
    out = images.numpy()  # shares memory with ``images``
    keep = np.zeros(len(rows), dtype=bool)
    kept = 0
    for i, data in enumerate(rows.drain()):
        try:
            out[kept] = decode_image(data, channels, size, pixel_dtype=pixel_dtype, resize=resize)
        except RejectError:
            continue
        keep[i] = True
        kept += 1
    return images[:kept], keep


def decode_shard(
    batches: Iterator[pa.RecordBatch],
    channels: int,
    size: tuple[int, int],
    available_bytes: int | None = -1,
) -> tuple[Shard, list[str]]:
    """The ``memory`` cache of :func:`load_shard`: every decodable row in one uint8 tensor."""
    return load_shard(batches, channels, size, "memory", available_bytes=available_bytes)


def warn_failed(shard: Shard) -> None:
    """One line in the executor's log for stream rows whose body failed to decode (read as zeros)."""
    if isinstance(shard.images, StreamImages) and shard.images.failed:
        print(
            f"sparkvision: {shard.images.failed} decodes of rows whose header read but body did not "
            "were replaced by zero images",
            file=sys.stderr,
        )


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


def pixel_stats(
    images: torch.Tensor | StreamImages, channels: int, sample: int = STATS_SAMPLE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of uint8 ``(N, C, H, W)`` pixels scaled to [0, 1], over all ranks.

    Counted as a histogram of the 256 values per channel, ``STATS_CHUNK_BYTES`` at a time: exact
    integer sums, whatever the chunking or order, and never a float copy of the pixels (a float64
    copy of the shard was 8x its size). The memory cache counts every row; the stream cache a
    seeded sample of ``sample`` rows per rank (every row when the shard has no more: the very same
    statistics as the memory cache). Every rank must call it (an all-reduce); the result is the
    model's preprocessing spec. Float rows (a float table's feature values) count as they are.
    """
    n = len(images)
    step = max(1, STATS_CHUNK_BYTES // max(1, math.prod(images.shape[1:])))
    if isinstance(images, torch.Tensor):
        chunks: Iterable[torch.Tensor] = (images[i : i + step] for i in range(0, n, step))
    else:
        ids = torch.arange(n)
        if n > sample:
            g = torch.Generator().manual_seed(1_000_003 + D.rank())
            ids = torch.randperm(n, generator=g)[:sample].sort().values  # in order: sequential reads
        chunks = (images[ids[i : i + step]] for i in range(0, len(ids), step))
    counts = torch.zeros(channels, 256, dtype=torch.int64)
    floats = torch.zeros(2 * channels + 1, dtype=torch.float64)  # a float table's sums, squares, count
    for x in chunks:
        if x.is_floating_point():  # feature values, not pixels: summed as they are
            xd = x.double().transpose(0, 1).reshape(channels, -1)
            floats += torch.cat(
                [xd.sum(1), (xd * xd).sum(1), torch.tensor([xd.shape[1]], dtype=torch.float64)]
            )
            continue
        for c in range(channels):
            counts[c] += torch.bincount(x[:, c].reshape(-1), minlength=256)
    v = torch.arange(256, dtype=torch.float64) / 255
    stats = torch.cat([counts.double() @ v, counts.double() @ (v * v), counts[:1].sum().double().view(1)])
    stats += floats
    stats = D.all_reduce_sum(stats)
    mean = stats[:channels] / stats[-1]
    std = (stats[channels : 2 * channels] / stats[-1] - mean**2).clamp_min(1e-12).sqrt()
    return mean, std
