"""``features``: detect -> crop -> embed (-> binary codes) in one Spark job; a features table
that ``index``, ``search`` and ``dedup`` take, recording the detector so queries are cropped too."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.ops.base import Cli, Operation, Progress, params_model, register
from sparkvision.ops.crop import CROP_FIELDS, crop_spec
from sparkvision.ops.embed import EmbedParams
from sparkvision.ops.fields import overwrite, positional

_EMBED = EmbedParams.model_fields

FeaturesParams = params_model(
    "FeaturesParams",
    "Detect each image's product, crop it with a margin and embed the crop (float features and, "
    "with --bits, binary codes), in one pass: JD's product-feature pipeline.",
    table=positional("Image (or detection) table.", "TABLE"),
    out=positional("Output features table (Parquet).", "OUT"),
    embedder=(
        Annotated[str, Cli(flags=("--embedder",))],
        Field(description="Model directory whose features embed the crops (from `train` or `pretrain`)."),
    ),
    **CROP_FIELDS,
    bits=(_EMBED["bits"].annotation, _EMBED["bits"]),
    code_method=(_EMBED["code_method"].annotation, _EMBED["code_method"]),
    sample=(_EMBED["sample"].annotation, _EMBED["sample"]),
    overwrite=overwrite(),
)


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.detect.pipeline import features_table

    return features_table(
        spark, p.detector, p.embedder, p.table, p.out, crop_spec(p), min_score=p.min_score,
        bits=p.bits, code_method=p.code_method, sample=p.sample, split=p.split, batch_size=p.batch_size,
    )  # fmt: skip


OPERATION = register(
    Operation(
        "features",
        FeaturesParams,
        run,
        "Detect, crop and embed (and code) every image in one pass.",
        inputs=("detector", "embedder", "table"),
        outputs=("out",),
        staged_outputs=("out",),
        models=("embedder",),
        result_key="out",
        module="sparkvision.detect.crop",
        summary_keys=("rows", "crops", "fallbacks", "errors", "images_per_s", "elapsed_s"),
    )
)
