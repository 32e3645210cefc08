"""``detect``: a trained detector over every image of a table, on the executors; a PNG preview."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.data.table import read_table
from sparkvision.detect.config import DETECT_BATCH, MIN_SCORE
from sparkvision.errors import ParamError
from sparkvision.fields import OptionalSplit
from sparkvision.ops.base import Operation, Progress, params_model, register
from sparkvision.ops.fields import overwrite, positional
from sparkvision.ops.paths import local_path
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress

DetectParams = params_model(
    "DetectParams",
    "Detect objects in every row of an image table with a detector from `train-detector`: boxes in pixels "
    "of each stored image, after NMS and the score filter.",
    model_dir=positional("Detector directory (from `sparkvision train-detector`).", "MODEL"),
    table=positional("Image (or detection) table.", "TABLE"),
    out=positional("Output detections table (Parquet).", "OUT"),
    min_score=(float, Field(MIN_SCORE, ge=0, le=1, description="Keep boxes scoring at least this.")),
    max_detections=(int, Field(10, ge=1, le=1000, description="Most boxes kept per image, best first.")),
    preview=(
        str | None,
        Field(None, description="Also write a PNG of a few rows with their boxes drawn (e.g. preview.png)."),
    ),
    preview_rows=(int, Field(8, ge=1, le=64, description="Rows in the preview (the table's first).")),
    split=(OptionalSplit, Field(None, description="Only this split (default: every row).")),
    batch_size=(
        int,
        Field(DETECT_BATCH, ge=1, le=4096, description="Images per detector call on the executors."),
    ),
    overwrite=overwrite(),
)


def check(p: Any) -> None:
    if p.preview is None:
        return
    if not p.preview.lower().endswith(".png"):
        raise ParamError("preview", f"{p.preview} is not a .png file name")
    preview, out = local_path(p.preview), local_path(p.out)
    if preview is not None and out is not None and os.path.commonpath([preview, out]) == out:
        # Spark would read the PNG as a part of the table (and staging replaces the directory).
        raise ParamError("preview", f"{p.preview} is inside out ({p.out}); write it beside the table")


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.detect.inference import detect_df, draw_preview, ship_detector
    from sparkvision.inference.runtime import configure_workers

    timer = Timer()
    model = ship_detector(spark, p.model_dir)
    threads = configure_workers(spark, p.batch_size)
    try:
        source = read_table(spark, p.table, p.split)
    except FileNotFoundError as e:
        raise ParamError("table", str(e)) from None
    out = storage.qualify(p.out)
    found = detect_df(spark, model, source, p.min_score, p.max_detections, p.batch_size, threads)
    with spark_progress(spark, "detect"):
        found.write.mode("overwrite").parquet(out)  # a fresh path aside (staged)
    progress.check_cancelled()
    agg = (
        spark.read.parquet(out)
        .agg(
            F.count("*").alias("rows"),
            F.count("error").alias("errors"),
            F.sum(F.size(F.coalesce("detections", F.array()))).alias("boxes"),
            F.sum((F.size(F.coalesce("detections", F.array())) > 0).cast("int")).alias("found"),
        )
        .first()
    )
    assert agg is not None  # a global aggregate has exactly one row
    elapsed = timer.elapsed
    summary: dict[str, Any] = {
        "output": p.out,
        "rows": int(agg.rows),
        "errors": int(agg.errors),
        "rows_with_detections": int(agg.found or 0),
        "detections": int(agg.boxes or 0),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(agg.rows / max(elapsed, 1e-9), 1),
    }
    if p.preview:
        sample = source.limit(p.preview_rows)
        rows = detect_df(spark, model, sample, p.min_score, p.max_detections, p.batch_size, threads, True)
        summary["preview"] = p.preview
        os.makedirs(os.path.dirname(os.path.abspath(p.preview)), exist_ok=True)
        summary["preview_rows"] = draw_preview(rows.collect(), p.preview)  # a few rows, by limit
    return summary


OPERATION = register(
    Operation(
        "detect",
        DetectParams,
        run,
        "Detect objects in every row of a table (boxes after NMS; a PNG preview).",
        inputs=("model_dir", "table"),
        outputs=("out", "preview"),  # preview is a file written in place: confined and checked like out
        staged_outputs=("out",),
        result_key="out",
        module="sparkvision.detect.inference",
        check=check,
        summary_keys=("rows", "errors", "rows_with_detections", "detections", "images_per_s", "elapsed_s"),
    )
)
