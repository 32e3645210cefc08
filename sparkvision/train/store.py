"""A rank's shard kept encoded, as the table holds it, and decoded batch by batch ahead of the step.

The ``stream`` shard cache (``--cache stream``; see :mod:`sparkvision.train.data` for the choice):
a table larger than the executors' memory can be trained on, because a rank never holds more than
its rows' encoded bytes (on local disk), a few small per-row arrays and the batches in flight.

- :class:`EncodedRows` receives the partition's Arrow batches and keeps each row's ``image``
  bytes exactly as stored, copied from the ``BinaryArray``'s data buffer (no Python object per
  row). The bytes stay in memory while they are small (``SPILL_BYTES``) and otherwise go to one
  file in the executor's local dir (``SPARK_LOCAL_DIRS``, which Spark sets for its Python
  workers; else the temp dir), unlinked as soon as it is opened, so nothing is left behind even if
  the process is killed.
- :class:`StreamImages` is a view of some of those rows, indexed like the decoded uint8
  ``(N, C, H, W)`` tensor of the ``memory`` cache: ``images[b]`` and ``images[i:j]`` return
  decoded tensors, so the methods' code runs unchanged on either. Rows decode with
  :func:`sparkvision.transforms.preprocess.decode_image` (the decoder of every model path) in a
  small thread pool (PIL releases the GIL while it decodes and resizes).
- :meth:`StreamImages.plan` takes the epoch's step plan (``(steps, local_batch)`` indices); the
  next ``depth`` planned batches then decode in the pool while the training step runs, and a
  request for the next planned batch takes it from that bounded queue. Any other request (a
  mid-epoch start, FixMatch's random draws of the unlabelled pool) decodes at once, split across
  the pool; consecutive slices (evaluation) read one slice ahead.
"""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import numpy as np
import pyarrow as pa
import torch

from sparkvision.data.images import PixelDtype, RejectError, mode_channels, open_image
from sparkvision.models.modeldir import Resize
from sparkvision.spark.filestore import spark_local_dirs
from sparkvision.transforms.preprocess import decode_image

# Encoded bytes a rank keeps in memory before spilling them to a local file. Small next to what a
# rank holds anyway (torch and the model take hundreds of MB), so a small table costs no disk
# and no file; large enough that the tests' and a laptop's tables never touch the disk.
SPILL_BYTES = 64 * 2**20
# Batches decoded ahead of the step (at least one per decode thread): (depth + 1) batches in memory.
PREFETCH = 3


def local_dirs() -> list[str]:
    """Spark's local dirs for this executor (``SPARK_LOCAL_DIRS``, which Spark sets for its Python
    workers from ``spark.local.dir`` or the cluster manager's), else the system temp dir."""
    return spark_local_dirs() or [tempfile.gettempdir()]


def roomiest(dirs: list[str]) -> str:
    """The dir with the most free space (Spark lists one per local disk)."""
    return max(dirs, key=lambda d: shutil.disk_usage(d).free)


def header_ok(data: bytes) -> bool:
    """Whether an encoded image passes the header checks every decoder makes first (an image at
    all, within the pixel limit, a mode we read): what ``stream`` checks once at load, for the
    price of a header read instead of a decode."""
    try:
        mode_channels(open_image(data))
    except RejectError:
        return False
    return True


class EncodedRows:
    """The ``image`` bytes of a partition's rows, in arrival order: in memory, or in one local file.

    ``append`` takes each Arrow batch's ``image`` column as it arrives; ``finish`` ends the
    loading; ``read(i)`` returns row ``i``'s bytes (thread-safe: ``os.pread`` on the file, slices
    of immutable chunks in memory). ``spill_bytes=None`` never spills (the ``memory`` cache decodes
    everything at once anyway).
    """

    def __init__(self, spill_dir: str | None = None, spill_bytes: int | None = SPILL_BYTES) -> None:
        self.spill_dir, self.spill_bytes = spill_dir, spill_bytes
        self.path: str | None = None  # the spill file's name (unlinked at once on POSIX)
        self._file: IO[bytes] | None = None
        self._chunks: list[bytes] = []  # in memory: one per batch
        self._bases: list[int] = []  # byte offset of each chunk's first byte
        self._starts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # per batch, then one array
        self._nulls: list[np.ndarray] = []
        self.size = 0  # encoded bytes so far
        self.starts = np.zeros(1, dtype=np.int64)  # row i is bytes starts[i]:starts[i + 1]
        self.nulls = np.zeros(0, dtype=bool)
        self._open: list[Any] = [None, None]  # (file, path left to delete): what closing releases
        self._finalizer = weakref.finalize(self, EncodedRows._release, self._open)

    @staticmethod
    def _release(holder: list[Any]) -> None:
        f, path = holder
        if f is not None:
            f.close()
        if path is not None and os.path.exists(path):
            os.remove(path)  # not unlinked at creation (a system without POSIX semantics)
        holder[:] = [None, None]

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def __len__(self) -> int:
        return len(self.starts) - 1

    def append(self, column: pa.Array) -> None:
        """Add one batch's ``image`` column (binary or large binary) from its buffers."""
        if isinstance(column, pa.ChunkedArray):
            for chunk in column.chunks:
                self.append(chunk)
            return
        if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            raise ValueError(f"the image column must be binary, got {column.type}")
        n = len(column)
        if n == 0:
            return
        width = np.int64 if pa.types.is_large_binary(column.type) else np.int32
        _, offsets_buf, data_buf = column.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=width)[column.offset : column.offset + n + 1]
        offsets = offsets.astype(np.int64)
        first, last = int(offsets[0]), int(offsets[-1])
        data = memoryview(data_buf)[first:last] if data_buf is not None else memoryview(b"")
        self._write(data)
        self._starts.append(offsets[1:] - first + self.size)
        self._nulls.append(column.is_null().to_numpy(zero_copy_only=False))
        self.size += last - first

    def _write(self, data: memoryview) -> None:
        if not len(data):
            return
        if self._file is None and self.spill_bytes is not None and self.size + len(data) > self.spill_bytes:
            self._spill()
        if self._file is not None:
            try:
                self._file.write(data)
            except OSError as e:
                raise ValueError(  # the one error kind a rank reports as one clear line
                    f"stream cache: cannot write this rank's rows to {self.spill_dir} ({e.strerror}); point "
                    "spark.local.dir at a local disk with room for the encoded table"
                ) from None
        else:
            self._bases.append(self.size)
            self._chunks.append(bytes(data))

    def _spill(self) -> None:
        try:
            fd, path = tempfile.mkstemp(prefix="sparkvision-shard-", suffix=".bin", dir=self.spill_dir)
        except OSError as e:
            raise ValueError(
                f"stream cache: cannot create a file in {self.spill_dir} ({e.strerror}); point "
                "spark.local.dir at a writable local disk"
            ) from None
        self._file = os.fdopen(fd, "w+b")
        self.path = path
        try:
            os.unlink(path)  # the open file lives on; its space is freed when it closes or we die
            self._open[:] = [self._file, None]
        except OSError:
            self._open[:] = [self._file, path]
        for chunk in self._chunks:
            self._file.write(chunk)
        self._chunks, self._bases = [], []

    def finish(self) -> None:
        """End of the batches: one offsets array, the file flushed for reading."""
        self.starts = np.concatenate(self._starts)
        self.nulls = np.concatenate(self._nulls) if self._nulls else np.zeros(0, dtype=bool)
        self._starts, self._nulls = [], []
        if self._file is not None:
            self._file.flush()

    def read(self, i: int) -> bytes:
        """Row ``i``'s encoded bytes (empty for a null)."""
        a, b = int(self.starts[i]), int(self.starts[i + 1])
        if self.nulls[i] or a == b:
            return b""
        if self._file is not None:
            return os.pread(self._file.fileno(), b - a, a)
        k = bisect.bisect_right(self._bases, a) - 1
        base = self._bases[k]
        return self._chunks[k][a - base : b - base]

    def drain(self) -> Iterator[bytes]:
        """Every row's bytes in order, releasing each in-memory chunk once read past: the
        ``memory`` cache's one decode pass holds the encoded and the decoded shard at most once."""
        for i in range(len(self)):
            if not self._file and self._bases and len(self._bases) > 1 and self.starts[i] >= self._bases[1]:
                self._chunks[0] = b""
                self._chunks, self._bases = self._chunks[1:], self._bases[1:]
            yield self.read(i)
        self.close()

    def close(self) -> None:
        """Free the bytes: drop the chunks, close (and so delete) the spill file."""
        self._chunks, self._bases = [], []
        self._file = None
        self._finalizer()


class BatchDecoder:
    """Decodes rows of an :class:`EncodedRows` to uint8 ``(B, C, H, W)`` tensors in a thread pool.

    A row that passed the load-time header check but fails to decode (a truncated body) becomes an
    all-zero image; ``failed`` counts them.
    """

    def __init__(
        self,
        rows: EncodedRows,
        channels: int,
        size: tuple[int, int],
        threads: int = 1,
        pixel_dtype: PixelDtype = "uint8",  # "float32": a float table's rows, float32 tensors
        resize: Resize = "stretch",  # the model's resize policy (preprocess.fit_size)
    ) -> None:
        self.rows, self.channels, self.size = rows, channels, (int(size[0]), int(size[1]))
        self.pixel_dtype, self.resize = pixel_dtype, resize
        self.threads = max(1, int(threads))
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sparkvision-decode")
        # Requests nobody planned: the caller's thread and these, not queued behind the prefetch.
        self.urgent = ThreadPoolExecutor(max(1, self.threads - 1), thread_name_prefix="sparkvision-now")
        self.failed = 0
        self._lock = threading.Lock()

    def empty(self, n: int) -> torch.Tensor:
        dtype = torch.float32 if self.pixel_dtype == "float32" else torch.uint8
        return torch.empty((n, self.channels, *self.size), dtype=dtype)

    def decode_into(self, out: np.ndarray, rows: np.ndarray) -> None:
        """Decode ``rows`` (store row numbers) into ``out`` (a uint8 ``(n, C, H, W)`` array)."""
        bad = 0
        for k, r in enumerate(rows.tolist()):
            try:
                out[k] = decode_image(
                    self.rows.read(r),
                    self.channels,
                    self.size,
                    pixel_dtype=self.pixel_dtype,
                    resize=self.resize,
                )
            except RejectError:
                out[k] = 0
                bad += 1
        if bad:
            with self._lock:
                self.failed += bad

    def decode(self, rows: np.ndarray) -> torch.Tensor:
        """One batch on the calling thread (a prefetch task)."""
        x = self.empty(len(rows))
        self.decode_into(x.numpy(), rows)
        return x

    def decode_now(self, rows: np.ndarray) -> torch.Tensor:
        """One batch nobody planned, waited for: split between the calling thread and the
        ``urgent`` threads (the prefetch pool may be busy with the next planned batches)."""
        x = self.empty(len(rows))
        out = x.numpy()
        parts = min(self.threads, max(1, len(rows) // 8))
        bounds = np.linspace(0, len(rows), parts + 1).astype(int)
        futures = [
            self.urgent.submit(self.decode_into, out[a:b], rows[a:b])
            for a, b in zip(bounds[1:-1], bounds[2:], strict=True)
        ]
        self.decode_into(out[: bounds[1]], rows[: bounds[1]])
        for f in futures:
            f.result()
        return x

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.urgent.shutdown(wait=True, cancel_futures=True)


class RowStore:
    """What the views of one shard share: the encoded rows and their decoder. ``close`` stops the
    decode threads and deletes the spill file (``RankTraining`` calls it, also on failure)."""

    def __init__(self, rows: EncodedRows, decoder: BatchDecoder) -> None:
        self.rows, self.decoder = rows, decoder

    def close(self) -> None:
        self.decoder.close()
        self.rows.close()


class StreamImages:
    """Rows ``ids`` of a :class:`RowStore`, indexed like a uint8 ``(N, C, H, W)`` tensor.

    ``images[b]`` (integer or boolean index tensor/array) and ``images[i:j]`` return decoded
    tensors; ``subset(mask)`` and ``head(n)`` return views without decoding anything.
    """

    def __init__(self, store: RowStore, ids: np.ndarray, depth: int = PREFETCH) -> None:
        self.store, self.ids = store, np.ascontiguousarray(ids, dtype=np.int64)
        self.depth = max(depth, store.decoder.threads)
        self._plan: torch.Tensor | None = None
        self._queue: deque[tuple[int, Future[torch.Tensor]]] = deque()
        self._submitted = 0  # planned steps handed to the pool so far
        self._ahead: tuple[int, int, Future[torch.Tensor]] | None = None  # slice read-ahead

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        d = self.store.decoder
        return (len(self.ids), d.channels, *d.size)

    def subset(self, mask: torch.Tensor | np.ndarray) -> StreamImages:
        m = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        return StreamImages(self.store, self.ids[m], self.depth)

    def head(self, n: int) -> StreamImages:
        return StreamImages(self.store, self.ids[:n], self.depth)

    # ------------------------------------------------------------------ indexing
    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            return self._slice(key)
        pos = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        if pos.ndim == 0:
            return self.store.decoder.decode(self.ids[[int(pos)]])[0]
        if pos.dtype == bool:
            pos = np.flatnonzero(pos)
        if self._plan is not None and isinstance(key, torch.Tensor) and key.dtype == torch.int64:
            taken = self._take_planned(key)
            if taken is not None:
                return taken
        return self.store.decoder.decode_now(self.ids[pos])

    def _slice(self, key: slice) -> torch.Tensor:
        start, stop, step = key.indices(len(self.ids))
        if step != 1:
            return self.store.decoder.decode_now(self.ids[start:stop:step])
        ahead, self._ahead = self._ahead, None
        x = ahead[2].result() if ahead is not None and ahead[:2] == (start, stop) else None
        if ahead is not None and x is None:
            ahead[2].cancel()
        if x is None:
            x = self.store.decoder.decode_now(self.ids[start:stop])
        if start < stop < len(self.ids):  # the next slice of the same length, while this one is used
            nxt = (stop, min(len(self.ids), stop + (stop - start)))
            self._ahead = (*nxt, self.store.decoder.pool.submit(self._decode, self.ids[nxt[0] : nxt[1]]))
        return x

    def _decode(self, rows: np.ndarray) -> torch.Tensor:
        return self.store.decoder.decode(rows)

    # ------------------------------------------------------------------ the epoch's plan
    def plan(self, idx: torch.Tensor, first: int = 0) -> None:
        """This epoch's step plan ``(steps, local_batch)`` (positions in this view), walked from
        step ``first`` (a resumed epoch): start decoding its first batches now."""
        self._cancel()
        self._plan = idx
        self._submitted = first
        self._fill()

    def _fill(self) -> None:
        assert self._plan is not None
        while len(self._queue) < self.depth and self._submitted < len(self._plan):
            s = self._submitted
            rows = self.ids[self._plan[s].numpy()]
            self._queue.append((s, self.store.decoder.pool.submit(self._decode, rows)))
            self._submitted += 1

    def _take_planned(self, b: torch.Tensor) -> torch.Tensor | None:
        """The decoded batch if ``b`` is the next planned one (or a later one: the plan then
        restarts there, e.g. an epoch resumed mid-way), else None."""
        plan = self._plan
        assert plan is not None
        if self._queue and torch.equal(plan[self._queue[0][0]], b):
            _, fut = self._queue.popleft()
            self._fill()
            return fut.result()
        nxt = self._queue[0][0] if self._queue else self._submitted
        if b.dim() != 1 or len(b) != plan.shape[1] or nxt >= len(plan):
            return None
        hits = (plan[nxt:] == b).all(1).nonzero()
        if len(hits) == 0:
            return None
        self._cancel()
        self._plan, self._submitted = plan, nxt + int(hits[0])
        self._fill()
        return self._take_planned(b)

    def _cancel(self) -> None:
        for _, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        self._plan = None

    @property
    def failed(self) -> int:
        return self.store.decoder.failed
