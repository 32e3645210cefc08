"""Building a sharded index (:mod:`sparkvision.retrieval.shards`) from the driver: plan, train, fill.

Three Spark jobs, none of which brings a vector to the driver:

1. count the rows with a vector (Parquet footers) and read one vector's length;
2. train: a sample of about ``train_size`` rows (at least 39 per IVF list, k-means' minimum) is
   shuffled to one task, which trains the coarse quantizer and PQ codebooks and writes
   ``trained.faiss``; flat and HNSW indexes need no training, and the driver writes their empty
   index itself (a few hundred bytes);
3. fill: the table is dealt round robin into N partitions; task ``s`` adds its rows to a copy of
   ``trained.faiss`` and writes ``shards/shard-s.faiss`` and ``ids/shard-s.parquet``.

The driver collects N summary rows (rows, bytes, seconds, peak RSS per shard) and writes
``index.json``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from typing import Any

import faiss
import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema

from sparkvision.errors import ParamError
from sparkvision.inference.runtime import task_threads
from sparkvision.retrieval.index import FEATURES_META, ID_COLUMNS, META_FILE, choose_index, new_index
from sparkvision.retrieval.shards import (
    BUILD_SCHEMA,
    DEFAULT_SHARD_MEMORY_MB,
    TRAIN_SCHEMA,
    TRAINED_FILE,
    auto_shards,
    build_task,
    bytes_per_vector,
    parse_shards,
    train_task,
)
from sparkvision.spark import filestore, storage
from sparkvision.spark.progress import spark_progress


def build_sharded_index(
    spark: SparkSession,
    features: str,
    out: str,
    *,
    shards: int | str = "auto",
    column: str | None = None,
    kind: str = "auto",
    params: dict[str, int] | None = None,
    train_size: int = 100_000,
    shard_memory_mb: int = DEFAULT_SHARD_MEMORY_MB,
    seed: int = 0,
) -> dict[str, Any]:
    """Build ``out`` as ``shards`` shard indexes on the executors; the summary says why.

    ``shards="auto"`` follows :func:`~sparkvision.retrieval.shards.auto_shards` with
    ``shard_memory_mb`` per task. Float features only (binary codes: the unsharded index).
    """
    t0 = time.perf_counter()
    count = parse_shards(shards)
    if count is None:
        raise ParamError("shards", "a sharded build needs a number of shards or 'auto'")
    src = spark.read.parquet(storage.qualify(features))
    column = column or "embedding"
    if column not in src.columns:
        raise ParamError(
            "features", f"{features} has no float column {column!r}; columns: {', '.join(src.columns)}"
        )
    if kind.startswith("binary") or dict(src.dtypes)[column] != "array<float>":
        raise ParamError("shards", "sharded indexes hold float features; index binary codes unsharded")
    df = src.where(F.col(column).isNotNull())
    keep = [c for c in ID_COLUMNS if c in src.columns]

    with spark_progress(spark, "index: count"):
        n = df.count()
        first = df.select(F.size(column).alias("d")).first() if n else None
    if not n or first is None:
        raise ValueError(f"features table {features} has no rows with a non-null {column!r}")
    d = int(first.d)
    choice = choose_index(n, d, False, kind)
    choice.params.update(params or {})
    nshards = auto_shards(n, d, choice, shard_memory_mb) if count == "auto" else int(count)
    if nshards > n:
        raise ParamError("shards", f"{nshards} shards for {n} rows: at most one shard per row")
    rule = (
        f"auto: ceil({n:,} rows x {bytes_per_vector(choice, d)} B / (half of {shard_memory_mb} MB "
        f"less the quantizer)) = {nshards}"
        if count == "auto"
        else f"given: {nshards}"
    )

    uri = storage.qualify(out)
    store = filestore.driver_store(spark, uri)
    threads = task_threads(spark)
    trained: dict[str, Any] = {"rows": 0}
    if choice.needs_training:
        size = max(train_size, 39 * choice.params["nlist"])
        sample = df.select(column).sample(fraction=min(1.0, 1.2 * size / n), seed=seed).limit(size)
        with spark_progress(spark, "index: train"):
            (row,) = (
                sample.repartition(1)
                .mapInArrow(train_task(uri, choice, d, column, threads), TRAIN_SCHEMA)
                .collect()
            )  # one task, one summary row
        trained = row.asDict()
    else:
        filestore.write_bytes(store, TRAINED_FILE, faiss.serialize_index(new_index(choice, d)).tobytes())
    t_train = time.perf_counter() - t0

    ids_schema = pa.schema([pa.field("id", pa.int64()), *to_arrow_schema(src.select(*keep).schema)])
    with spark_progress(spark, "index: shards"):
        built = (
            df.select(*keep, column)
            .repartition(nshards)
            .mapInArrow(build_task(uri, choice.kind, column, ids_schema, threads), BUILD_SCHEMA)
            .collect()
        )
    parts = sorted((r.asDict() for r in built), key=lambda r: r["shard"])
    rows = sum(p["rows"] for p in parts)
    index_bytes = sum(p["index_bytes"] for p in parts)
    meta = {
        "features": features,
        "column": column,
        "rows": rows,
        "dim": d,
        "metric": "inner_product",
        "choice": asdict(choice),
        "sharded": True,
        "build_id": uuid.uuid4().hex,
        "shards": [
            {k: p[k] for k in ("shard", "rows", "index_bytes", "ids_bytes", "max_rss_mb")} for p in parts
        ],
        "shard_rule": rule,
        "shard_memory_mb": shard_memory_mb,
        "index_bytes": index_bytes,
        "train": {**trained, "seconds": round(t_train, 3)},
        "build_s": round(time.perf_counter() - t0, 3),
    }
    meta.update(features_provenance(spark, features))
    filestore.write_bytes(store, META_FILE, json.dumps(meta, indent=2).encode())
    return {
        "index": out,
        "kind": choice.kind,
        "factory": choice.factory,
        "rows": rows,
        "dim": d,
        "metric": "inner_product",
        "params": choice.params,
        "shards": nshards,
        "index_bytes": index_bytes,
        "max_task_rss_mb": max([p["max_rss_mb"] for p in parts] + [trained.get("max_rss_mb", 0.0)]),
        "explain": f"{choice.reason}; {nshards} shards ({rule})",
        "build_s": meta["build_s"],
    }


def features_provenance(spark: SparkSession, features: str) -> dict[str, Any]:
    """The model (and detector, crop) ``sparkvision embed`` recorded beside the features table, so
    image queries are embedded as the indexed images were."""
    store = filestore.driver_store(spark, storage.qualify(features))
    if not store.exists(FEATURES_META):
        return {"model_dir": None, "detector": None, "crop": None}
    fmeta = json.loads(filestore.read_bytes(store, FEATURES_META))
    return {k: fmeta.get(k) for k in ("model_dir", "detector", "crop")}
