"""``evaluate``: accuracy, per-class precision/recall/F1 and the confusion matrix of a model on a table."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.data.table import read_table
from sparkvision.errors import ParamError
from sparkvision.fields import OptionalSplit
from sparkvision.ops.base import Operation, Progress, params_model, register
from sparkvision.ops.fields import inference_batch, positional

EvaluateParams = params_model(
    "EvaluateParams",
    "Score a model on the labelled rows of a table.",
    model_dir=positional("Model directory from `sparkvision train`.", "MODEL_DIR"),
    table=positional("Image table.", "TABLE"),
    split=(
        OptionalSplit,
        Field("test", description="Split to evaluate ('all' or 'none' for every labelled row)."),
    ),
    out=(
        str | None,
        Field(None, description="Where to write evaluation.json and the PNG (default: the model dir)."),
    ),
    batch_size=inference_batch(),
)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.inference.evaluate import evaluate

    split = None if p.split == "all" else p.split
    if read_table(spark, p.table, split).where(F.col("label").isNotNull()).limit(1).count() == 0:
        # Scoring nothing would replace the model's evaluation with an empty one.
        raise ParamError(
            "split", f"{p.table} has no labelled rows" + (f" in split {split!r}" if split else "")
        )
    progress.check_cancelled()
    return evaluate(spark, p.model_dir, p.table, split, p.out, p.batch_size)


OPERATION = register(
    Operation(
        "evaluate",
        EvaluateParams,
        run,
        "Accuracy, per-class metrics and confusion matrix (written into the model dir).",
        inputs=("model_dir", "table"),
        outputs=("out",),
        models=("model_dir",),
        result_key="model_dir",
        module="sparkvision.inference.evaluate",
        evaluates=True,
        writes_into=("out",),
        summary_keys=("rows", "accuracy", "macro_f1", "elapsed_s"),
    )
)
