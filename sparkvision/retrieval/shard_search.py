"""Batch search over a sharded index on the executors: one (shard, query batch) pair per task.

The queries are dealt into B batches (``query_batch_rows`` each, from their count) and crossed
with the N shards; each (shard, batch) pair goes to a partition of its own, so a task loads one
shard (memory-mapped where FAISS allows it) and searches its batch against it, emitting that
shard's top-k per query. Spark then merges them: per query, the k best candidates of the N*k by
score (ties to the smaller id, as :func:`~sparkvision.retrieval.shards.merge_topk`), joined to
the shards' id mappings for content ids and paths.

IVF shards share one coarse quantizer (:mod:`~sparkvision.retrieval.shards`), so each query's
``nprobe`` nearest lists are found once, in a pass before the crossing (:func:`assign_task`), and
every shard task scans those lists with FAISS's ``search_preassigned``. Searching each shard whole
would repeat the quantizer search in every shard: at 10M vectors in 10 shards of
``IVF16384,Flat`` that repeated search (16,384 centroids per query) cost more than the list scans
themselves at nprobe 4-16.

Placing pair ``i`` in partition ``i`` exactly: ``repartition(P, key)`` sends a row to
``pmod(murmur3(key), P)``, the hash Spark's ``F.hash`` computes, so for each pair we pick the
smallest integer key that hashes to it (:func:`pair_keys`, a tiny Spark job over a range). Hash
collisions would otherwise put two shards in one task now and then.

Every candidate row says which shard it came from and which task (partition) searched it, with
that task's peak RSS, so a test or a benchmark counts shards per task and memory per task from
the output itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from sparkvision.retrieval.index import META_FILE, vectors_of
from sparkvision.retrieval.shards import (
    IDS_DIR,
    ROW_MASK,
    TRAINED_FILE,
    ids_file,
    local_file,
    max_rss_mb,
    merge_topk,
    read_shard,
    shard_file,
    split_ids,
    task_cpus,
    tune,
)
from sparkvision.spark import filestore, storage

DEFAULT_QUERY_BATCH_ROWS = 65_536  # 32 MB of 128-d float queries per task, beside its shard
CANDIDATE_SCHEMA = (
    "qid long, query_content_id string, query_path string, id long, score float, shard int, "
    "task int, max_rss_mb double"
)
QUERY_KEYS = ("qid", "query_content_id", "query_path")


def read_meta(spark: SparkSession | None, uri: str) -> dict[str, Any]:
    store = filestore.driver_store(spark, storage.qualify(uri))
    if not store.exists(META_FILE):
        raise FileNotFoundError(f"{uri} is not an index directory ({META_FILE} is missing)")
    meta: dict[str, Any] = json.loads(filestore.read_bytes(store, META_FILE))
    return meta


def is_sharded(spark: SparkSession | None, uri: str) -> bool:
    try:
        return bool(read_meta(spark, uri).get("sharded"))
    except (FileNotFoundError, ValueError):
        return False


def pair_keys(spark: SparkSession, parts: int) -> DataFrame:
    """``(pair, key)``: for each pair ``0..parts-1`` the smallest long that Spark's hash
    partitioning into ``parts`` sends to partition ``pair``.

    Hashes fall in partitions at random, so ``parts * (ln(parts) + 30)`` candidates leave a
    partition without a key with probability about ``e^-30``; the test checks every pair.
    """
    m = parts * (math.ceil(math.log(parts + 1)) + 30)
    return (
        spark.range(m)
        .select(F.pmod(F.hash("id"), F.lit(parts)).alias("pair"), F.col("id").alias("key"))
        .groupBy("pair")
        .agg(F.min("key").alias("key"))
    )


def search_task(
    uri: str, kind: str, k: int, params: dict[str, int], threads: int, build_id: str = ""
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """Searches every query row of this task against the one shard its rows name."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        faiss.omp_set_num_threads(threads)
        ctx = TaskContext.get()
        task = ctx.partitionId() if ctx is not None else 0
        index: Any = None
        shard = -1
        for batch in batches:
            if not batch.num_rows:
                continue
            t = pa.Table.from_batches([batch])
            shards = np.unique(t.column("shard").to_numpy())
            if len(shards) != 1 or (index is not None and int(shards[0]) != shard):
                raise RuntimeError(f"task {task} was given shards {sorted({shard, *shards.tolist()})}")
            if index is None:
                shard = int(shards[0])
                index, _ = read_shard(local_file(uri, shard_file(shard), build_id), kind)
                tune(index, params)
            x = np.ascontiguousarray(vectors_of(t, "embedding"))
            if "lists" in t.column_names:  # the coarse lists, found once per query (assign_task)
                lists = list_matrix(t, "lists", np.int64)
                ldist = list_matrix(t, "ldist", np.float32)
                ivf: Any = faiss.extract_index_ivf(index)  # the Python wrapper's (x, k, Iq, Dq)
                scores, ids = ivf.search_preassigned(x, k, lists, ldist)
            else:
                scores, ids = index.search(x, k)
            qi, j = np.nonzero(ids >= 0)  # fewer than k vectors in the shard: -1 rows dropped
            take = pa.array(qi)
            yield pa.RecordBatch.from_pydict(
                {
                    "qid": batch.column("qid").take(take),
                    "query_content_id": batch.column("query_content_id").take(take),
                    "query_path": batch.column("query_path").take(take),
                    "id": pa.array(ids[qi, j], pa.int64()),
                    "score": pa.array(scores[qi, j], pa.float32()),
                    "shard": pa.array(np.full(len(qi), shard, np.int32)),
                    "task": pa.array(np.full(len(qi), task, np.int32)),
                    "max_rss_mb": pa.array(np.full(len(qi), max_rss_mb())),
                }
            )

    return run


ASSIGN_FIELDS = "lists array<long>, ldist array<float>"


def list_matrix(t: pa.Table, column: str, dtype: type) -> np.ndarray:
    """A list column of equal-length rows as a C-contiguous ``(rows, width)`` array."""
    col = t.column(column).combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return np.ascontiguousarray(flat.reshape(len(col), -1))


def assign_task(
    uri: str, nprobe: int, threads: int, build_id: str = ""
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """Adds each query's ``nprobe`` nearest coarse lists (``lists``) and their distances
    (``ldist``), from the trained index every shard copies."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        faiss.omp_set_num_threads(threads)
        quantizer: Any = None
        for batch in batches:
            if not batch.num_rows:
                continue
            if quantizer is None:
                trained, _ = read_shard(local_file(uri, TRAINED_FILE, build_id), "ivf", mmap=False)
                quantizer = faiss.extract_index_ivf(trained).quantizer
            x = np.ascontiguousarray(vectors_of(pa.Table.from_batches([batch]), "embedding"))
            dist, lists = quantizer.search(x, nprobe)
            off = pa.array(np.arange(0, (len(x) + 1) * nprobe, nprobe), pa.int32())
            yield pa.RecordBatch.from_arrays(
                [
                    *batch.columns,
                    pa.ListArray.from_arrays(off, pa.array(lists.ravel(), pa.int64())),
                    pa.ListArray.from_arrays(off, pa.array(dist.ravel(), pa.float32())),
                ],
                names=[*batch.schema.names, "lists", "ldist"],
            )

    return run


def with_qid(queries: DataFrame) -> DataFrame:
    """``qid, query_content_id, query_path, embedding[, error]``; a given ``qid`` column is kept."""
    qid = F.col("qid") if "qid" in queries.columns else F.monotonically_increasing_id()
    cols = [
        qid.alias("qid"),
        F.col("content_id").alias("query_content_id"),
        F.col("path").alias("query_path"),
        F.col("embedding"),
    ]
    if "error" in queries.columns:
        cols.append(F.col("error"))
    return queries.select(*cols)


def shard_candidates(
    spark: SparkSession,
    uri: str,
    queries: DataFrame,
    k: int,
    nprobe: int | None = None,
    query_rows: int | None = None,
    query_batch_rows: int = DEFAULT_QUERY_BATCH_ROWS,
    preassign: bool = True,
) -> DataFrame:
    """Lazy: each query's top-k in each shard (``CANDIDATE_SCHEMA``), one (shard, batch) per task.

    ``preassign=False`` has every shard task search its shard whole (the quantizer once per shard:
    kept for benchmarks to measure what the assignment pass saves).

    ``queries``: ``qid, query_content_id, query_path, embedding`` (see :func:`with_qid`).
    ``query_rows`` (else counted) sizes the batches.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    uri = storage.qualify(uri)
    meta = read_meta(spark, uri)
    nshards = len(meta["shards"])
    params = {key: v for key, v in meta["choice"].get("params", {}).items() if key in ("nprobe", "efSearch")}
    if nprobe is not None:
        params["nprobe"] = nprobe
    q = queries.where(F.col("embedding").isNotNull()).select(*QUERY_KEYS, "embedding")
    nq = q.count() if query_rows is None else query_rows
    kind = meta["choice"]["kind"]
    carry = ["embedding"]
    if preassign and kind in ("ivf", "ivfpq") and params.get("nprobe"):
        nprobe_ = min(int(params["nprobe"]), int(meta["choice"]["params"].get("nlist", params["nprobe"])))
        schema = f"{', '.join(f'{c} {t}' for c, t in q.dtypes)}, {ASSIGN_FIELDS}"
        q = q.mapInArrow(assign_task(uri, nprobe_, task_cpus(spark), meta.get("build_id", "")), schema)
        carry += ["lists", "ldist"]
    batches = max(1, math.ceil(nq / max(1, query_batch_rows)))
    parts = nshards * batches
    shard_ids = spark.range(nshards).select(F.col("id").cast("int").alias("shard"))
    paired = (
        q.withColumn("qbatch", F.pmod(F.xxhash64("qid"), F.lit(batches)))
        .crossJoin(F.broadcast(shard_ids))
        .withColumn("pair", F.col("shard") * batches + F.col("qbatch"))
        .join(F.broadcast(pair_keys(spark, parts)), "pair")
        .repartition(parts, "key")
        .select(*QUERY_KEYS, *carry, "shard")
    )
    return paired.mapInArrow(
        search_task(uri, kind, k, params, task_cpus(spark), meta.get("build_id", "")),
        CANDIDATE_SCHEMA,
    )


def merge_topk_df(
    cands: DataFrame, k: int, keys: tuple[str, ...] = QUERY_KEYS, carry: tuple[str, ...] = ("shard",)
) -> DataFrame:
    """Per query (``keys``), the k best candidates by score, ties to the smaller id:
    ``keys, rank, id, score, *carry``."""
    hit = F.struct((-F.col("score")).alias("neg"), F.col("id"), F.col("score"), *(F.col(c) for c in carry))
    top = cands.groupBy(*keys).agg(F.slice(F.sort_array(F.collect_list(hit)), 1, k).alias("hits"))
    return top.select(*keys, F.posexplode("hits").alias("pos", "hit")).select(
        *keys,
        (F.col("pos") + 1).cast("int").alias("rank"),
        F.col("hit.id").alias("id"),
        F.col("hit.score").alias("score"),
        *(F.col(f"hit.{c}").alias(c) for c in carry),
    )


def ids_df(spark: SparkSession, uri: str) -> DataFrame:
    """The shards' id mappings as one table: ``id, content_id, path, label_name``."""
    ids = spark.read.parquet(filestore.join(storage.qualify(uri), IDS_DIR))
    for c in ("content_id", "path", "label_name"):
        if c not in ids.columns:
            ids = ids.withColumn(c, F.lit(None).cast("string"))
    return ids.select("id", "content_id", "path", "label_name")


def sharded_search_df(
    spark: SparkSession,
    uri: str,
    queries: DataFrame,
    k: int = 10,
    nprobe: int | None = None,
    exclude_self: bool = False,
    query_rows: int | None = None,
) -> DataFrame:
    """Lazy: search's result rows (query_content_id, query_path, rank, content_id, path,
    label_name, score, error) for every row of ``queries`` (content_id, path, embedding[, error])."""
    base = with_qid(queries)
    kk = k + 1 if exclude_self else k
    merged = merge_topk_df(shard_candidates(spark, uri, base, kk, nprobe, query_rows), kk)
    res = merged.join(ids_df(spark, uri), "id", "left")
    if exclude_self:
        res = res.where(~F.col("content_id").eqNullSafe(F.col("query_content_id")))
        order = Window.partitionBy("qid").orderBy(F.col("score").desc(), F.col("id"))
        res = res.withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= k)
    hits = res.select(
        "query_content_id", "query_path", F.col("rank").cast("int").alias("rank"), "content_id",
        "path", "label_name", "score", F.lit(None).cast("string").alias("error"),
    )  # fmt: skip
    err = (
        F.coalesce(F.col("error"), F.lit("no embedding"))
        if "error" in base.columns
        else F.lit("no embedding")
    )
    missing = base.where(F.col("embedding").isNull()).select(
        "query_content_id", "query_path", F.lit(None).cast("int").alias("rank"),
        *(F.lit(None).cast("string").alias(c) for c in ("content_id", "path", "label_name")),
        F.lit(None).cast("float").alias("score"), err.alias("error"),
    )  # fmt: skip
    return hits.unionByName(missing)


def shard_ids_table(uri: str, columns: list[str], meta: dict[str, Any]) -> pa.Table:
    """The id mappings of a local sharded index in shard order: row ``r`` of this table is the
    vector whose id :func:`id_rows` maps to ``r`` (dedup's row numbering)."""
    local = filestore.local_path(uri)
    if local is None:
        raise ValueError(f"{uri}: dedup reads the id mapping from a local (or shared) path")
    parts = [pq.read_table(f"{local}/{ids_file(s['shard'])}", columns=columns) for s in meta["shards"]]
    return pa.concat_tables(parts)


def id_rows(ids: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Global ids -> rows of :func:`shard_ids_table` (shards in order, each from its row 0)."""
    offsets = np.zeros(max(s["shard"] for s in meta["shards"]) + 1, np.int64)
    for s in meta["shards"]:
        offsets[s["shard"]] = s["rows"]
    starts = np.concatenate([[0], np.cumsum(offsets)[:-1]])
    shard, row = split_ids(ids)
    return starts[shard] + (row & ROW_MASK)


def sharded_pairs(
    spark: SparkSession, uri: str, features: str, column: str, k: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dedup's candidates from a sharded index of ``features`` itself: ``(a, b, cosine)`` as rows
    of :func:`shard_ids_table`, each pair once, only pairs with cosine ``>= threshold`` reaching
    the driver. A query finds its own row through the id mapping (content id and path)."""
    uri = storage.qualify(uri)
    meta = read_meta(spark, uri)
    queries = (
        spark.read.parquet(storage.qualify(features))
        .where(F.col(column).isNotNull())
        .select("content_id", "path", F.col(column).alias("embedding"))
    )
    own = (
        ids_df(spark, uri)
        .select(
            F.col("id").alias("self_id"),
            F.col("content_id").alias("query_content_id"),
            F.col("path").alias("query_path"),
        )
        .dropDuplicates(["query_content_id", "query_path"])
    )
    merged = merge_topk_df(shard_candidates(spark, uri, with_qid(queries), k), k)
    pairs = (
        merged.where(F.col("score") >= threshold)
        .join(own, ["query_content_id", "query_path"])
        .where(F.col("self_id") != F.col("id"))
        .select("self_id", "id", "score")
        .toArrow()
    )
    a = id_rows(pairs.column("self_id").to_numpy(), meta)
    b = id_rows(pairs.column("id").to_numpy(), meta)
    s = pairs.column("score").to_numpy().astype(np.float32)
    return np.minimum(a, b), np.maximum(a, b), s


EXACT_SCHEMA = "qid long, id long, score float, content_id string, path string"


def exact_task(
    queries: np.ndarray, k: int, column: str, threads: int
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A flat scan of this task's rows for every query; its running top-k, one row per hit."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        faiss.omp_set_num_threads(threads)
        nq = len(queries)
        best_s = np.full((nq, k), np.nan, np.float32)
        best_i = np.full((nq, k), -1, np.int64)
        names: dict[int, tuple[str, str]] = {}
        seen = 0
        for batch in batches:
            t = pa.Table.from_batches([batch])
            t = t.filter(pa.compute.is_valid(t.column(column)))
            if not t.num_rows:
                continue
            flat = faiss.IndexFlatIP(queries.shape[1])
            flat.add(np.ascontiguousarray(vectors_of(t, column)))
            s, i = flat.search(queries, min(k, t.num_rows))
            best_s, best_i = merge_topk([best_s, s], [best_i, np.where(i >= 0, i + seen, -1)], k)
            cids, paths = t.column("content_id").to_pylist(), t.column("path").to_pylist()
            for r in np.unique(best_i[(best_i >= seen)]):
                names[int(r)] = (cids[r - seen], paths[r - seen])
            names = {r: names[r] for r in np.unique(best_i[best_i >= 0]).tolist()}
            seen += t.num_rows
        qi, j = np.nonzero(best_i >= 0)
        rows = [names[int(r)] for r in best_i[qi, j]]
        yield pa.RecordBatch.from_pydict(
            {
                "qid": pa.array(qi, pa.int64()),
                "id": pa.array(best_i[qi, j], pa.int64()),  # this task's row: replaced by a hash
                "score": pa.array(best_s[qi, j], pa.float32()),
                "content_id": [c for c, _ in rows],
                "path": [p for _, p in rows],
            }
        )

    return run
