"""Distributed classification of a whole table (``sparkvision predict``).

Each executor runs :func:`predict_batches` over Arrow batches through the shared runtime
(:mod:`sparkvision.inference.runtime`). A row that cannot be decoded gets an ``error`` and nulls,
never a failed job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkvision.inference.modelref import ModelRef, ship_model
from sparkvision.inference.runtime import (
    KEEP_COLUMNS,
    configure_workers,
    error_mask,
    image_source,
    model_batches,
    rows_column,
    summarise_output,
)
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress
from sparkvision.spark.skew import rebalance
from sparkvision.spark.taskclock import clock_path

PREDICT_SCHEMA = (
    "content_id string, path string, split string, label int, label_name string, pred_label int, "
    "pred_name string, confidence float, topk_labels array<int>, topk_probs array<float>, error string"
)
PREDICT_COLUMNS = [
    *KEEP_COLUMNS,
    "pred_label",
    "pred_name",
    "confidence",
    "topk_labels",
    "topk_probs",
    "error",
]


def predict_columns(
    batch: pa.RecordBatch, logits: torch.Tensor, errors: list[str | None], top_k: int, names: list[str]
) -> pa.RecordBatch:
    """One output batch of PREDICT_SCHEMA: KEEP_COLUMNS passed through, the top ``top_k`` classes
    (softmax probabilities) of each row, nulls and the error on rows that did not decode.

    Every column is built whole from numpy, with no Python object per row (the hot path runs
    thousands of rows a second per task).
    """
    probs = torch.softmax(logits.float(), dim=1)
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    p = top.values.numpy().astype(np.float32, copy=False)
    idx = top.indices.numpy().astype(np.int32)
    error = pa.array(errors, pa.string())
    bad = error_mask(error)
    pred = idx[:, 0]
    unnamed = pred >= len(names)  # a model with more outputs than class names
    name_mask = unnamed if bad is None else bad | unnamed
    name_index = pa.array(np.where(unnamed, 0, pred), pa.int32(), mask=name_mask)
    cols = [batch.column(c) for c in KEEP_COLUMNS]
    cols += [
        pa.array(pred, pa.int32(), mask=bad),
        pa.array(names, pa.string()).take(name_index),
        pa.array(p[:, 0], pa.float32(), mask=bad),
        rows_column(idx, bad, pa.int32()),
        rows_column(p, bad, pa.float32()),
        error,
    ]
    return pa.RecordBatch.from_arrays(cols, names=PREDICT_COLUMNS)


def predict_batches(
    model: ModelRef, top_k: int, batch_size: int, threads: int = 1, clock: str | None = None
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: (image, KEEP_COLUMNS) -> PREDICT_SCHEMA, with ``threads`` torch threads.

    ``clock``: the file a profile's tasks append their stage times to (:mod:`~sparkvision.spark.taskclock`).
    """

    def columns(batch: pa.RecordBatch, logits: torch.Tensor, errors: list, blob: Any) -> pa.RecordBatch:
        return predict_columns(batch, logits, errors, top_k, blob.class_names)

    return model_batches(model, "logits", batch_size, threads, clock, "predict", columns)


def predict_df(
    spark: SparkSession, model_dir: str, df: DataFrame, top_k: int = 3, batch_size: int = 512
) -> DataFrame:
    """Lazy predictions for an image DataFrame (columns image + KEEP_COLUMNS)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = ship_model(spark, model_dir)
    threads = configure_workers(spark, batch_size)
    df = rebalance(spark, df, "predict").df  # RP: no task holds the stage up
    body = predict_batches(model, top_k, batch_size, threads, clock_path())
    return df.mapInArrow(body, PREDICT_SCHEMA)


def predict_table(
    spark: SparkSession,
    model_dir: str,
    table: str,
    out: str,
    *,
    top_k: int = 3,
    batch_size: int = 512,
    split: str | None = None,
    mode: str = "overwrite",
) -> dict[str, Any]:
    """Classify every row of ``table`` (or one split) and write a Parquet prediction table."""
    timer = Timer()
    out_q = storage.qualify(out)
    preds = predict_df(spark, model_dir, image_source(spark, table, split), top_k, batch_size)
    with spark_progress(spark, "predict"):
        preds.write.mode(mode).parquet(out_q)
    # Compare names, not indices: the table and the model may order their classes differently.
    # avg skips the nulls of rows without a label or with an error.
    scored = F.col("label_name").isNotNull() & F.col("error").isNull()
    hit = F.when(scored, (F.col("label_name") == F.col("pred_name")).cast("double"))
    summary = summarise_output(spark, out_q, timer, "predict", {"accuracy_on_labelled_rows": F.avg(hit)})
    acc = summary["accuracy_on_labelled_rows"]
    summary["accuracy_on_labelled_rows"] = None if acc is None else round(float(acc), 5)
    return summary
