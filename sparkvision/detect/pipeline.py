"""The driver side of ``sparkvision crop`` and ``sparkvision features`` (the tasks' side is
:mod:`sparkvision.detect.crop`).

``features`` is one Spark job over the source table: detect, crop and embed per Arrow batch, and,
with ``bits``, the binary code too. A hasher is fitted first on the crops of a sample of at most
``sample`` rows (a small job of its own, the same pipeline), because codes need a hasher before the
one pass that writes them: one pass over the data set, not ``embed``'s write-then-code two.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkvision.data.detection import is_detection_table, read_detection_table
from sparkvision.data.table import read_meta, read_table, write_meta
from sparkvision.detect.config import DETECT_BATCH, MIN_SCORE, CropSpec
from sparkvision.detect.crop import (
    CROPS_SCHEMA,
    SOURCE_COLUMNS,
    crop_batches,
    features_df,
)
from sparkvision.detect.inference import ship_detector
from sparkvision.errors import ParamError
from sparkvision.inference.modelref import ship_model
from sparkvision.inference.runtime import configure_workers
from sparkvision.retrieval.codes import DEFAULT_METHOD, fit_hasher
from sparkvision.retrieval.embed import write_features_meta
from sparkvision.retrieval.index import FEATURES_HASHER, local_path, vectors_of
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress


def _source(spark: SparkSession, table: str, split: str | None, boxes: bool = False) -> DataFrame:
    """The rows to crop; with ``boxes``, a detection table's true boxes too (crops are then
    labelled by the item they show)."""
    try:
        if boxes and is_detection_table(spark, table):
            return read_detection_table(spark, table, split).select(*SOURCE_COLUMNS, "boxes")
        return read_table(spark, table, split).select(*SOURCE_COLUMNS)
    except FileNotFoundError as e:
        raise ParamError("table", str(e)) from None


def crop_table(
    spark: SparkSession,
    detector: str,
    table: str,
    out: str,
    spec: CropSpec,
    *,
    min_score: float = MIN_SCORE,
    split: str | None = None,
    batch_size: int = DETECT_BATCH,
) -> dict[str, Any]:
    """Write the crops of ``table``'s images as an image table ``out`` (PNG, with ``source_content_id``,
    ``box`` and ``fallback``); rows whose image does not decode have no crop and are counted."""
    timer = Timer()
    ref = ship_detector(spark, detector)
    threads = configure_workers(spark, batch_size)
    source = _source(spark, table, split, boxes=True)
    crops = source.mapInArrow(crop_batches(ref, spec, min_score, batch_size, threads), CROPS_SCHEMA)
    out_q = storage.qualify(out)
    with spark_progress(spark, "crop"):
        crops.where(F.col("error").isNull()).drop("error").write.mode("overwrite").parquet(out_q)
    write_meta(spark, out_q, read_meta(spark, table))
    agg = (
        spark.read.parquet(out_q)
        .agg(
            F.count("*").alias("crops"),
            F.countDistinct("source_content_id").alias("sources"),
            F.sum(F.col("fallback").cast("int")).alias("fallbacks"),
        )
        .first()
    )
    assert agg is not None  # a global aggregate has exactly one row
    rows = source.count()
    elapsed = timer.elapsed
    return {
        "output": out,
        "rows": rows,
        "crops": int(agg.crops),
        "fallbacks": int(agg.fallbacks or 0),
        "errors": rows - int(agg.sources),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(rows / max(elapsed, 1e-9), 1),
    }


def features_table(
    spark: SparkSession,
    detector: str,
    embedder: str,
    table: str,
    out: str,
    spec: CropSpec,
    *,
    min_score: float = MIN_SCORE,
    bits: int | None = None,
    code_method: str = DEFAULT_METHOD,
    sample: int = 100_000,
    split: str | None = None,
    batch_size: int = DETECT_BATCH,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the crop features of ``table`` to ``out``: a features table that ``index``, ``search``
    and ``dedup`` take, whose ``_retrieval.json`` names the detector and crop, so a query image is
    cropped as the table's images were."""
    timer = Timer()
    dref = ship_detector(spark, detector)
    try:
        eref = ship_model(spark, embedder)
    except ParamError as e:
        raise ParamError("embedder", str(e).split(": ", 1)[-1]) from None
    threads = configure_workers(spark, batch_size)
    source = _source(spark, table, split)
    hasher = None
    summary: dict[str, Any] = {}
    if bits is not None:
        n = source.count()
        part = source.sample(fraction=min(1.0, 1.1 * sample / max(n, 1)), seed=seed).limit(sample)
        with spark_progress(spark, "features (hasher sample)"):
            got = (
                features_df(dref, eref, part, spec, min_score, batch_size, threads)
                .where(F.col("embedding").isNotNull())
                .select("embedding")
                .toArrow()
            )  # at most `sample` rows: what the hasher is fitted on, on the driver
        if got.num_rows == 0:
            raise ValueError(f"{table}: no image of the sample could be embedded; nothing to fit codes on")
        x = vectors_of(got, "embedding")
        hasher = fit_hasher(code_method, x, bits, seed=seed)
        balance = np.unpackbits(hasher.encode(x), axis=1).mean(0)
        summary.update(
            {"code_method": code_method, "bits": bits, "fit_rows": len(x),
             "bit_balance_min": round(float(balance.min()), 3), "bit_balance_max": round(float(balance.max()), 3)}
        )  # fmt: skip
    out_q = storage.qualify(out)
    with spark_progress(spark, "features"):
        features_df(dref, eref, source, spec, min_score, batch_size, threads, hasher).write.mode(
            "overwrite"
        ).parquet(out_q)
    if hasher is not None:
        hasher.save(os.path.join(local_path(out_q), FEATURES_HASHER))
    meta: dict[str, Any] = {
        "model_dir": os.path.abspath(embedder),
        "detector": os.path.abspath(detector),
        "crop": {**asdict(spec), "min_score": min_score},
        "table": table,
        "split": split,
    }
    if bits is not None:
        meta.update({"code_method": code_method, "bits": bits, "fit_rows": summary["fit_rows"]})
    agg = (
        spark.read.parquet(out_q)
        .agg(
            F.count("*").alias("rows"),
            F.count("error").alias("errors"),
            F.sum(F.col("fallback").cast("int")).alias("fallbacks"),
            F.max(F.size("embedding")).alias("dim"),
        )
        .first()
    )
    assert agg is not None  # a global aggregate has exactly one row
    meta["dim"] = agg.dim
    write_features_meta(out_q, meta)
    elapsed = timer.elapsed
    sources = source.count()
    return {
        "output": out,
        "rows": sources,
        "crops": int(agg.rows) - int(agg.errors),
        "fallbacks": int(agg.fallbacks or 0),
        "errors": int(agg.errors),
        "dim": agg.dim,
        **summary,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(sources / max(elapsed, 1e-9), 1),
    }
