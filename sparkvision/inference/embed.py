"""Distributed embedding of a whole table (``sparkvision embed``): L2-normalised backbone features.

Each executor runs :func:`embed_batches` over Arrow batches through the shared runtime
(:mod:`sparkvision.inference.runtime`); retrieval (codes, indexes, search) starts from this table.
A row that cannot be decoded gets an ``error`` and a null embedding, never a failed job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkvision.inference.modelref import ModelRef, ship_model
from sparkvision.inference.runtime import (
    KEEP_COLUMNS,
    configure_workers,
    image_source,
    model_batches,
    summarise_output,
    vectors_column,
)
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress
from sparkvision.spark.skew import rebalance
from sparkvision.spark.taskclock import clock_path

EMBED_SCHEMA = (
    "content_id string, path string, split string, label int, label_name string, "
    "embedding array<float>, error string"
)
EMBED_COLUMNS = [*KEEP_COLUMNS, "embedding", "error"]


def embed_batches(
    model: ModelRef, batch_size: int, threads: int = 1, clock: str | None = None
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: (image, KEEP_COLUMNS) -> EMBED_SCHEMA, with ``threads`` torch threads.

    ``clock``: the file a profile's tasks append their stage times to (:mod:`~sparkvision.spark.taskclock`).
    """

    def columns(batch: pa.RecordBatch, feats: torch.Tensor, errors: list, blob: Any) -> pa.RecordBatch:
        cols = [batch.column(c) for c in KEEP_COLUMNS]
        cols += [vectors_column(feats.float().numpy(), errors), pa.array(errors, pa.string())]
        return pa.RecordBatch.from_arrays(cols, names=EMBED_COLUMNS)

    return model_batches(model, "features", batch_size, threads, clock, "embed", columns)


def embed_df(spark: SparkSession, model_dir: str, df: DataFrame, batch_size: int = 512) -> DataFrame:
    """Lazy embeddings for an image DataFrame (columns image + KEEP_COLUMNS)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = ship_model(spark, model_dir)
    threads = configure_workers(spark, batch_size)
    df = rebalance(spark, df, "embed").df  # RP: no task holds the stage up
    return df.mapInArrow(embed_batches(model, batch_size, threads, clock_path()), EMBED_SCHEMA)


def embed_table(
    spark: SparkSession,
    model_dir: str,
    table: str,
    out: str,
    *,
    batch_size: int = 512,
    split: str | None = None,
    mode: str = "overwrite",
) -> dict[str, Any]:
    """L2-normalised backbone features of every row, as Parquet (content_id, path, ..., embedding)."""
    timer = Timer()
    out_q = storage.qualify(out)
    emb = embed_df(spark, model_dir, image_source(spark, table, split), batch_size)
    with spark_progress(spark, "embed"):
        emb.write.mode(mode).parquet(out_q)
    dim = F.max(F.when(F.col("embedding").isNotNull(), F.size("embedding")))
    return summarise_output(spark, out_q, timer, "embed", {"dim": dim})
