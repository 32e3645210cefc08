"""``embed``: L2-normalised backbone features of every image on the executors, optionally binary codes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.fields import OptionalSplit
from sparkvision.ops.base import Operation, Progress, params_model, register
from sparkvision.ops.fields import inference_batch, overwrite, positional
from sparkvision.retrieval.codes import DEFAULT_METHOD

EmbedParams = params_model(
    "EmbedParams",
    "Backbone features (and binary codes) of every row of an image table.",
    model_dir=positional("Model directory (from `sparkvision train` or `pretrain`).", "MODEL"),
    table=positional("Image table to embed.", "TABLE"),
    out=positional("Output features table (Parquet).", "OUT"),
    bits=(
        Literal[32, 64, 128] | None,
        Field(None, description="Also add a binary `code` column of 32, 64 or 128 bits."),
    ),
    code_method=(
        Literal["deepbit", "itq", "lsh"],
        Field(
            DEFAULT_METHOD,
            description="itq (learned rotation of PCA, no labels) | deepbit (learned, no labels) | lsh",
        ),
    ),
    sample=(int, Field(100_000, ge=1, description="Embeddings used to fit the codes (driver memory).")),
    split=(OptionalSplit, Field(None, description="Only this split of the table.")),
    overwrite=overwrite(),
    batch_size=inference_batch(),
)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.retrieval.embed import embed_with_codes

    return embed_with_codes(
        spark,
        p.model_dir,
        p.table,
        p.out,
        bits=p.bits,
        method=p.code_method,
        sample=p.sample,
        split=p.split,
        batch_size=p.batch_size,
    )


OPERATION = register(
    Operation(
        "embed",
        EmbedParams,
        run,
        "Backbone features (and binary codes) of a table.",
        inputs=("model_dir", "table"),
        outputs=("out",),
        staged_outputs=("out",),
        models=("model_dir",),
        result_key="out",
        module="sparkvision.retrieval.embed",
        summary_keys=("rows_written", "rows", "errors", "images_per_s", "elapsed_s"),
    )
)
