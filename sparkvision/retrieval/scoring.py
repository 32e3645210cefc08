"""Verification of candidate pairs on the executors: the second stage of near-duplicate detection.

The driver writes the candidate pairs to Parquet; the executors join them with both images'
thumbnails from the descriptor table, score each pair with :func:`sparkvision.retrieval.verify.verify_pairs`
and write every pair with its cosine and score (``OUT/_pairs``), so thresholds can be re-chosen
later without recomputing. The driver reads back only the scores.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.inference.runtime import rebatch, task_threads
from sparkvision.retrieval.verify import VerifyConfig, verify_pairs
from sparkvision.spark import storage
from sparkvision.spark.compat import default_parallelism
from sparkvision.spark.progress import spark_progress

PAIR_SCHEMA = (
    "a long, b long, content_id_a string, path_a string, content_id_b string, path_b string, "
    "cosine float, score float"
)
PAIR_ID_COLUMNS = ("a", "b", "content_id_a", "path_a", "content_id_b", "path_b")


def verify_batches(
    size: int, batch_size: int, threads: int = 1
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: candidate pairs with both thumbnails -> PAIR_SCHEMA with the verification score.

    Pairs of identical bytes (same content id) score 1 without being computed. ``threads``: torch
    threads for the scoring (:func:`~sparkvision.inference.runtime.task_threads` on the driver).
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        torch.set_num_threads(threads)
        cfg = VerifyConfig(size=size)
        for batch in rebatch(batches, batch_size):
            n = batch.num_rows
            same = np.asarray(
                pc.equal(batch.column("content_id_a"), batch.column("content_id_b")).to_numpy(
                    zero_copy_only=False
                ),
                bool,
            )
            score = np.ones(n, np.float32)
            todo = np.flatnonzero(~same)
            if len(todo):
                ta = batch.column("thumb_a").to_pylist()
                tb = batch.column("thumb_b").to_pylist()
                a = np.frombuffer(b"".join(ta[i] for i in todo), np.uint8).reshape(-1, size, size)
                b = np.frombuffer(b"".join(tb[i] for i in todo), np.uint8).reshape(-1, size, size)
                score[todo] = verify_pairs(a.astype(np.float32) / 255, b.astype(np.float32) / 255, cfg)
            yield pa.RecordBatch.from_pydict(
                {
                    **{c: batch.column(c) for c in PAIR_ID_COLUMNS},
                    "cosine": batch.column("cosine"),
                    "score": pa.array(score, pa.float32()),
                }
            )

    return run


def score_candidates(
    spark: SparkSession,
    desc_dir: str,
    pairs_dir: str,
    ids: pa.Table,
    a: np.ndarray,
    b: np.ndarray,
    cosine: np.ndarray,
    size: int,
    batch_size: int,
) -> np.ndarray:
    """Verification scores for candidate pairs ``(a, b)`` (index rows, sorted by ``(a, b)``).

    The pairs go to Parquet (``pairs_dir``/``_input``), are joined on the executors with the
    thumbnails in the descriptor table by (content_id, path), scored, and written to ``pairs_dir``.
    """
    cids = ids.column("content_id")
    paths = ids.column("path")
    ta = pa.array(a, pa.int64())
    tb = pa.array(b, pa.int64())
    table = pa.table(
        {
            "a": ta,
            "b": tb,
            "content_id_a": cids.take(ta),
            "path_a": paths.take(ta),
            "content_id_b": cids.take(tb),
            "path_b": paths.take(tb),
            "cosine": pa.array(cosine, pa.float32()),
        }
    )
    input_dir = pairs_dir + "_input"
    os.makedirs(input_dir, exist_ok=True)
    pq.write_table(table, os.path.join(input_dir, "pairs.parquet"))
    thumbs = (
        spark.read.parquet(storage.qualify(desc_dir))
        .where(F.col("thumb").isNotNull())
        .select("content_id", "path", "thumb")
        .dropDuplicates(["content_id", "path"])
    )

    def side(s: str):
        return thumbs.select(
            F.col("content_id").alias(f"content_id_{s}"),
            F.col("path").alias(f"path_{s}"),
            F.col("thumb").alias(f"thumb_{s}"),
        )

    n_parts = max(1, min(len(a) // 2000 + 1, 4 * default_parallelism(spark)))
    joined = (
        spark.read.parquet(storage.qualify(input_dir))
        .repartition(n_parts)
        .join(side("a"), ["content_id_a", "path_a"])
        .join(side("b"), ["content_id_b", "path_b"])
    )
    with spark_progress(spark, "dedup: verify pairs"):
        joined.mapInArrow(verify_batches(size, batch_size, task_threads(spark)), PAIR_SCHEMA).write.mode(
            "overwrite"
        ).parquet(storage.qualify(pairs_dir))
    shutil.rmtree(input_dir, ignore_errors=True)
    got = pq.read_table(pairs_dir, columns=["a", "b", "score"])
    ga, gb, gs = (got.column(c).to_numpy() for c in ("a", "b", "score"))
    order = np.lexsort((gb, ga))
    ga, gb, gs = ga[order], gb[order], gs[order]
    if len(ga) != len(a) or not (np.array_equal(ga, a) and np.array_equal(gb, b)):
        raise RuntimeError(f"verification returned {len(ga)} of {len(a)} candidate pairs")
    return gs.astype(np.float32)
