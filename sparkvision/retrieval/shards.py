"""Sharded FAISS indexes: trained once, built and searched on the executors, one shard per task.

``sparkvision index --shards N|auto`` writes, under the index URI (any URI the library's
:mod:`~sparkvision.spark.filestore` reaches)::

    INDEX/
      index.json              what was built and why, with ``"shards"``: one entry per shard
      trained.faiss           the trained, empty index (coarse quantizer, PQ codebooks): a few MB
      shards/shard-00000.faiss  shard 0: the trained index plus its vectors, under their int64 ids
      ids/shard-00000.parquet   shard 0's id mapping: id, content_id, path (and the label columns)

Why this shape. An unsharded index (:func:`~sparkvision.retrieval.index.build_index`) is built by
one process and loaded whole by every searcher: at 100M 128-d vectors that is 51 GB per worker.
Here the quantizer and codebooks are trained once, on a sample, in one executor task (the only
vectors that ever meet in one place are that sample); every shard is a copy of that trained index
filled by one task with its part of the table, so all shards share one coarse quantizer and their
scores are comparable: the global top-k is the top-k of the per-shard top-k's. The driver reads
no vectors; it only counts rows, plans and writes ``index.json``.

Ids. A vector's id is ``shard << 40 | row``: its shard and its row in that shard, assigned by the
task that adds it, so no Spark column (and no second pass) is needed to number the rows, and
``ids/`` read as a table joins search results back to content ids.

Tasks reach the index URI through :func:`task_store`: a local path (or ``file:`` URI) through
``os``, which on a cluster must be a mount every executor shares; any other URI through
``pyarrow.fs`` (``s3://``, ``gs://``, ``hdfs://`` with libhdfs), as a Spark Connect client does.
"""

from __future__ import annotations

import math
import os
import re
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import TaskContext

from sparkvision.errors import ParamError
from sparkvision.retrieval.index import IndexChoice, new_index, vectors_of
from sparkvision.spark import filestore
from sparkvision.spark.filestore import ArrowStore, LocalStore, Store

TRAINED_FILE = "trained.faiss"
SHARD_DIR = "shards"
IDS_DIR = "ids"
ROW_BITS = 40  # a shard holds at most 2**40 rows; 2**23 shards fit the rest of an int64
ROW_MASK = (1 << ROW_BITS) - 1
DEFAULT_SHARD_MEMORY_MB = 1024
SHARD_FILL = 0.5  # a shard's resident bytes take at most this share of a task's memory budget
ID_BYTES = 8

BUILD_SCHEMA = "shard int, rows long, index_bytes long, ids_bytes long, seconds double, max_rss_mb double"
TRAIN_SCHEMA = "rows long, bytes long, seconds double, max_rss_mb double"


@dataclass
class Neighbours:
    """Search results: ``scores`` and ``rows`` are ``(Q, k)``; row -1 means fewer than k results
    (rows are an unsharded index's row numbers, or a sharded one's ids)."""

    scores: np.ndarray
    rows: np.ndarray


def shard_file(shard: int) -> str:
    return f"{SHARD_DIR}/shard-{shard:05d}.faiss"


def ids_file(shard: int) -> str:
    return f"{IDS_DIR}/shard-{shard:05d}.parquet"


def global_ids(shard: int, start: int, count: int) -> np.ndarray:
    """Ids of rows ``start .. start+count-1`` of ``shard``."""
    if not 0 <= shard < 1 << (63 - ROW_BITS):
        raise ValueError(f"shard {shard} is out of range")
    if start + count > ROW_MASK + 1:
        raise ValueError(f"a shard holds at most {ROW_MASK + 1:,} rows")
    return (np.int64(shard) << ROW_BITS) | np.arange(start, start + count, dtype=np.int64)


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(shard, row)`` of each id."""
    ids = np.asarray(ids, np.int64)
    return ids >> ROW_BITS, ids & ROW_MASK


# ---------------------------------------------------------------------------------------------
# How many shards (pure)
# ---------------------------------------------------------------------------------------------


def bytes_per_vector(choice: IndexChoice, d: int) -> int:
    """Resident bytes one vector costs in a shard: its code plus its int64 id (and HNSW's links)."""
    if choice.kind == "ivfpq":
        m = re.search(r"PQ(\d+)", choice.factory)
        return (int(m.group(1)) if m else d // 4) + ID_BYTES
    if choice.kind == "hnsw":
        return 4 * d + 2 * choice.params.get("M", 32) * 4 + ID_BYTES  # level 0 holds 2M links
    return 4 * d + ID_BYTES  # flat, ivf: the float vector itself


def fixed_bytes(choice: IndexChoice, d: int) -> int:
    """Bytes every shard holds whatever its size: the coarse quantizer's centroids (and PQ tables)."""
    nlist = choice.params.get("nlist", 0)
    return nlist * d * 4 + (256 * d * 4 if choice.kind == "ivfpq" else 0)


def auto_shards(n: int, d: int, choice: IndexChoice, memory_mb: int = DEFAULT_SHARD_MEMORY_MB) -> int:
    """Shards for ``n`` vectors so that one shard fits a task's ``memory_mb``.

    The rule: ``ceil(n * bytes_per_vector / (SHARD_FILL * budget - fixed_bytes))``. A shard's own
    bytes (codes, ids, the shared quantizer) take at most half the budget; the other half is for
    the task's query batch, FAISS's search buffers (k results per query) and the Python worker.
    At least one shard, at most one per vector.
    """
    budget = memory_mb * (1 << 20) * SHARD_FILL - fixed_bytes(choice, d)
    if budget <= 0:
        raise ParamError(
            "shard_memory_mb",
            f"{memory_mb} MB cannot hold even the quantizer of {choice.factory} "
            f"({fixed_bytes(choice, d) / 2**20:.0f} MB); raise it or use fewer lists",
        )
    return int(min(max(1, math.ceil(n * bytes_per_vector(choice, d) / budget)), n))


def parse_shards(value: str | int | None) -> int | str | None:
    """``None`` (unsharded), ``"auto"`` or a positive count, from the CLI/API's string or int."""
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ParamError("shards", f"{value!r} is not a number of shards or 'auto'") from None
    if n < 1:
        raise ParamError("shards", f"must be >= 1 or 'auto', got {n}")
    return n


# ---------------------------------------------------------------------------------------------
# Merging per-shard top-k (pure)
# ---------------------------------------------------------------------------------------------


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The global top-k of per-shard results: higher score first, ties to the smaller id.

    ``scores[s]``, ``ids[s]``: ``(Q, k_s)`` from shard ``s``; id -1 (FAISS's "no result", when a
    shard holds fewer than k_s candidates) is skipped. Returns ``(Q, k)``, padded with NaN / -1.
    The Spark merge (:func:`~sparkvision.retrieval.shard_search.merge_topk_df`) uses the same order.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = np.concatenate([np.asarray(x, np.float32) for x in scores], axis=1)
    i = np.concatenate([np.asarray(x, np.int64) for x in ids], axis=1)
    valid = (i >= 0) & ~np.isnan(s)
    neg = np.where(valid, -s, np.inf)
    order = np.lexsort((np.where(valid, i, np.iinfo(np.int64).max), neg), axis=1)[:, :k]
    top_s = np.take_along_axis(np.where(valid, s, np.nan), order, axis=1)
    top_i = np.take_along_axis(np.where(valid, i, -1), order, axis=1)
    if top_s.shape[1] < k:
        pad = k - top_s.shape[1]
        top_s = np.pad(top_s, ((0, 0), (0, pad)), constant_values=np.nan)
        top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
    return top_s.astype(np.float32), top_i


# ---------------------------------------------------------------------------------------------
# Files: stores, mmap
# ---------------------------------------------------------------------------------------------


def task_store(uri: str) -> Store:
    """The index URI's store inside a task (no JVM there): ``os`` for local paths, else ``pyarrow.fs``."""
    return LocalStore(uri) if filestore.local_path(uri) is not None else ArrowStore(uri)


def mmap_flags(kind: str) -> int:
    """FAISS's read flags that memory-map a shard of ``kind``: IVF inverted lists map with
    ``IO_FLAG_MMAP`` (read-only on-disk lists); flat codes and HNSW with ``IO_FLAG_MMAP_IFC``."""
    if kind in ("ivf", "ivfpq"):
        return faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    return int(getattr(faiss, "IO_FLAG_MMAP_IFC", 0))


_LOCAL_COPIES: dict[str, str] = {}  # remote shard URI -> its copy on this executor's disk


def local_file(uri: str, rel: str, build_id: str = "") -> str:
    """A local path of ``rel`` under ``uri``: the file itself, or for remote stores a copy in
    Spark's local dirs, made once per process and build (``index.json``'s ``build_id``, so a
    rebuilt index is fetched again); FAISS maps local files only."""
    local = filestore.local_path(uri)
    if local is not None:
        return os.path.join(local, rel)
    store = task_store(uri)
    key = f"{filestore.join(uri, rel)}@{build_id}"
    hit = _LOCAL_COPIES.get(key)
    if hit is None or not os.path.exists(hit):
        fd, hit = tempfile.mkstemp(suffix=os.path.splitext(rel)[1], dir=filestore.scratch_dir())
        os.close(fd)
        filestore.download(store, rel, hit)
        _LOCAL_COPIES[key] = hit
    return hit


def read_shard(path: str, kind: str, mmap: bool = True) -> tuple[Any, bool]:
    """``(index, mapped)``: the shard memory-mapped where FAISS allows it for ``kind``, else read."""
    flags = mmap_flags(kind) if mmap else 0
    if flags:
        try:
            return faiss.read_index(path, flags), True
        except RuntimeError:  # this index type has no mapped reader: read it whole
            pass
    return faiss.read_index(path), False


def tune(index: Any, params: dict[str, int]) -> None:
    """Search-time parameters (nprobe, efSearch) through any wrapper (IDMap) FAISS puts around them."""
    space = faiss.ParameterSpace()
    for name in ("nprobe", "efSearch"):
        if name in params:
            space.set_index_parameter(index, name, int(params[name]))


def task_cpus(spark: Any) -> int:
    """FAISS threads for one task: ``spark.task.cpus``, read on the driver and passed to the task.

    Not :func:`sparkvision.inference.runtime.task_threads`, which is the same rule: importing it
    would load torch into every Python worker that runs a shard task.
    """
    return max(1, int(str(spark.conf.get("spark.task.cpus", "1"))))


def max_rss_mb() -> float:
    """This process's peak RSS (Linux reports kB): what a task reports about itself."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------------------------------------
# Task bodies (mapInArrow): training once, adding one shard
# ---------------------------------------------------------------------------------------------


def train_task(
    uri: str, choice: IndexChoice, d: int, column: str, threads: int
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """Trains ``choice`` on every row this (single) task receives and writes ``trained.faiss``."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(threads)
        parts = [vectors_of(pa.Table.from_batches([b]), column) for b in batches if b.num_rows]
        sample = np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, d), np.float32)
        index = new_index(choice, d)
        if choice.needs_training:
            if len(sample) < choice.params.get("nlist", 1):
                raise ValueError(
                    f"{len(sample)} training rows for {choice.params.get('nlist')} lists; "
                    "use fewer lists or a bigger sample"
                )
            index.train(sample)
        data = faiss.serialize_index(index).tobytes()
        filestore.write_bytes(task_store(uri), TRAINED_FILE, data)
        yield pa.RecordBatch.from_pydict(
            {
                "rows": [len(sample)],
                "bytes": [len(data)],
                "seconds": [time.perf_counter() - t0],
                "max_rss_mb": [max_rss_mb()],
            }
        )

    return run


def needs_id_map(kind: str) -> bool:
    """Flat and HNSW indexes number rows themselves; IVF ones take ids in ``add_with_ids``."""
    return kind not in ("ivf", "ivfpq")


def build_task(
    uri: str, kind: str, column: str, ids_schema: pa.Schema, threads: int
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """Adds this partition's rows to a copy of ``trained.faiss`` as shard ``partitionId`` and
    writes the shard and its id mapping; one summary row (rows, bytes, seconds, peak RSS)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        t0 = time.perf_counter()
        ctx = TaskContext.get()
        shard = ctx.partitionId() if ctx is not None else 0
        faiss.omp_set_num_threads(threads)
        store = task_store(uri)
        trained = filestore.read_bytes(store, TRAINED_FILE)
        index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
        del trained
        if needs_id_map(kind):
            index = faiss.IndexIDMap(index)
        rows = 0
        with tempfile.TemporaryDirectory(dir=filestore.scratch_dir()) as tmp:
            ids_path = os.path.join(tmp, "ids.parquet")
            with pq.ParquetWriter(ids_path, ids_schema) as writer:
                for batch in batches:
                    if not batch.num_rows:
                        continue
                    t = pa.Table.from_batches([batch])
                    ids = global_ids(shard, rows, t.num_rows)
                    index.add_with_ids(np.ascontiguousarray(vectors_of(t, column)), ids)
                    cols = {"id": pa.array(ids)}
                    cols.update({n: t.column(n) for n in ids_schema.names if n != "id"})
                    writer.write_table(pa.table(cols).cast(ids_schema))
                    rows += t.num_rows
            index_path = os.path.join(tmp, "shard.faiss")
            faiss.write_index(index, index_path)
            del index
            index_bytes, _ = filestore.upload(store, shard_file(shard), index_path)
            ids_bytes, _ = filestore.upload(store, ids_file(shard), ids_path)
        yield pa.RecordBatch.from_pydict(
            {
                "shard": pa.array([shard], pa.int32()),
                "rows": [rows],
                "index_bytes": [index_bytes],
                "ids_bytes": [ids_bytes],
                "seconds": [time.perf_counter() - t0],
                "max_rss_mb": [max_rss_mb()],
            }
        )

    return run
