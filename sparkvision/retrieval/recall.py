"""``sparkvision index --check``: recall@k of an index against brute force, on sampled queries.

Approximate indexes trade recall for speed through ``nlist``, ``nprobe`` and the PQ size, and how
much depends on the data: clustered image embeddings reach 0.95 recall@10 at a few percent of
the lists probed where isotropic noise needs most of them (docs/retrieval.md). So the check runs
on the user's own table: ``queries`` rows are sampled from it, their exact top-k found by a flat
scan of the whole table on the executors (each task keeps a running top-k of its rows per query,
Spark merges the tasks'), and recall@k is the share of those the index returns, at the index's
``nprobe`` and at two and four times it, so one run shows which way to tune.

The sampled query vectors (1,000 x 128 floats: 0.5 MB by default) are the only vectors that reach
the driver: they travel to the exact scan's tasks inside its function, as a search's parameters.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.retrieval.index import vectors_of
from sparkvision.retrieval.search import open_index, search_df
from sparkvision.retrieval.shard_search import EXACT_SCHEMA, exact_task, merge_topk_df
from sparkvision.retrieval.shards import task_cpus
from sparkvision.spark import storage


def check_recall(
    spark: SparkSession,
    index: str,
    features: str,
    *,
    k: int = 10,
    queries: int = 1000,
    column: str = "embedding",
    nprobes: list[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@k of ``index`` on ``queries`` rows sampled from ``features``, per nprobe."""
    if k < 1 or queries < 1:
        raise ValueError(f"k and queries must be >= 1, got {k} and {queries}")
    meta = open_index(index).meta
    table = spark.read.parquet(storage.qualify(features)).where(F.col(column).isNotNull())
    n = int(meta["rows"])
    sample = (
        table.sample(fraction=min(1.0, 2.0 * queries / max(n, 1)), seed=seed)
        .limit(queries)
        .select("content_id", "path", column)
        .toArrow()
    )
    qvecs = np.ascontiguousarray(vectors_of(sample, column))
    nq = len(qvecs)
    if nq == 0:
        raise ValueError(f"features table {features} has no rows to sample queries from")

    t0 = time.perf_counter()
    exact = table.select("content_id", "path", column).mapInArrow(
        exact_task(qvecs, k, column, task_cpus(spark)), EXACT_SCHEMA
    )
    exact = exact.withColumn("id", F.xxhash64("content_id", "path"))  # ties: the same order everywhere
    truth = merge_topk_df(exact, k, ("qid",), carry=("content_id", "path")).select(
        F.col("qid").cast("string").alias("qid"), F.struct("content_id", "path").alias("hit")
    )
    truth = truth.cache()
    n_truth = truth.count()
    exact_s = time.perf_counter() - t0

    qdf = spark.createDataFrame(
        pa.table(
            {
                "content_id": [str(i) for i in range(nq)],
                "path": sample.column("path"),
                "embedding": sample.column(column),
            }
        )
    )
    kind = meta["choice"]["kind"]
    base = int(meta["choice"].get("params", {}).get("nprobe", 0)) or None
    nlist = int(meta["choice"].get("params", {}).get("nlist", 0))
    sweep: list[int | None] = [None]
    if kind in ("ivf", "ivfpq") and base:
        sweep = list(nprobes or sorted({min(base * f, nlist) for f in (1, 2, 4)}))
    rows = []
    for nprobe in sweep:
        t1 = time.perf_counter()
        found = search_df(spark, index, qdf, k, nprobe).where(F.col("rank").isNotNull())
        found = found.select(
            F.col("query_content_id").alias("qid"), F.struct("content_id", "path").alias("hit")
        )
        hits = found.join(truth, ["qid", "hit"]).count()
        seconds = time.perf_counter() - t1
        rows.append(
            {
                "nprobe": nprobe or base,
                "recall": round(hits / max(n_truth, 1), 4),
                "seconds": round(seconds, 3),
                "queries_per_s": round(nq / max(seconds, 1e-9), 1),
            }
        )
    truth.unpersist()
    return {
        "k": k,
        "queries": nq,
        "kind": kind,
        "default_nprobe": base,
        f"recall@{k}": rows[0]["recall"],
        "sweep": rows,
        "exact_s": round(exact_s, 3),
    }
