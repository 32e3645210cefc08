"""``predict``: classify every image of a table on the executors; undecodable rows get an error column."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.fields import OptionalSplit
from sparkvision.ops.base import Cli, Operation, Progress, params_model, register
from sparkvision.ops.fields import inference_batch, overwrite, positional

SOURCE_NOTE = "_sparkvision_source.json"  # beside a derived table: which image table it came from

PredictParams = params_model(
    "PredictParams",
    "Classify every row of an image table.",
    model_dir=positional("Model directory.", "MODEL_DIR"),
    table=positional("Image table to classify.", "TABLE"),
    out=positional("Output Parquet table of predictions.", "OUT"),
    top_k=(
        Annotated[int, Cli(flags=("--top-k", "-k"))],
        Field(3, ge=1, le=1000, description="Probabilities kept per row."),
    ),
    batch_size=inference_batch(),
    split=(OptionalSplit, Field(None, description="Only this split (default: every row).")),
    overwrite=overwrite(),
)


def write_source_note(out: str, table: str) -> None:
    """Lets the table browser find thumbnails for a prediction table (it keeps ids, not bytes)."""
    local = out.removeprefix("file://").removeprefix("file:")
    if os.path.isdir(local):
        with open(os.path.join(local, SOURCE_NOTE), "w") as f:
            json.dump({"table": table}, f)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.inference.predict import predict_table

    out = predict_table(
        spark, p.model_dir, p.table, p.out, top_k=p.top_k, batch_size=p.batch_size, split=p.split
    )
    write_source_note(p.out, p.table)
    return {**out, "source_table": p.table}


OPERATION = register(
    Operation(
        "predict",
        PredictParams,
        run,
        "Classify every row of a table.",
        inputs=("model_dir", "table"),
        outputs=("out",),
        staged_outputs=("out",),
        models=("model_dir",),
        result_key="out",
        module="sparkvision.inference.predict",
        summary_keys=(
            "rows_written",
            "rows",
            "errors",
            "images_per_s",
            "elapsed_s",
            "accuracy_on_labelled_rows",
        ),
    )
)
