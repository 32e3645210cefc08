"""``crop``: each image's detected product cut out, as an image table that train, embed, search
and dedup take. The crop options are defined here once; ``features`` uses the same."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.detect.config import DETECT_BATCH, MIN_SCORE, CropSpec
from sparkvision.fields import OptionalSplit
from sparkvision.ops.base import Cli, Operation, Progress, params_model, register
from sparkvision.ops.fields import overwrite, positional

_DEFAULT = CropSpec()

# The options every detect-then-crop operation takes (crop, features), one definition.
CROP_FIELDS: dict[str, Any] = {
    "detector": (
        Annotated[str, Cli(flags=("--detector",))],
        Field(description="Detector directory (from `sparkvision train-detector`)."),
    ),
    "min_score": (
        float,
        Field(MIN_SCORE, ge=0, le=1, description="Boxes scoring below this are not cropped."),
    ),
    "margin": (
        float,
        Field(
            _DEFAULT.margin,
            ge=0,
            le=2,
            description="Context kept around a box, as a share of its width/height.",
        ),
    ),
    "all_boxes": (
        bool,
        Field(_DEFAULT.all_boxes, description="Crop every box above --min-score, not only the best one."),
    ),
    "split": (OptionalSplit, Field(None, description="Only this split of the table.")),
    "batch_size": (
        int,
        Field(DETECT_BATCH, ge=1, le=4096, description="Images per detector call on the executors."),
    ),
}

CropParams = params_model(
    "CropParams",
    "Detect each image's products and cut them out (with a margin) into an image table; an image "
    "where nothing is detected keeps its whole picture, marked `fallback`.",
    table=positional("Image (or detection) table.", "TABLE"),
    out=positional("Output crops table (an image table, PNG).", "OUT"),
    **CROP_FIELDS,
    max_side=(
        int | None,
        Field(None, ge=8, le=8192, description="Shrink crops to this longer side (default: as cut)."),
    ),
    overwrite=overwrite(),
)


def crop_spec(p: Any) -> CropSpec:
    return CropSpec(margin=p.margin, all_boxes=p.all_boxes, max_side=getattr(p, "max_side", None))


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.detect.pipeline import crop_table

    return crop_table(
        spark, p.detector, p.table, p.out, crop_spec(p), min_score=p.min_score, split=p.split,
        batch_size=p.batch_size,
    )  # fmt: skip


OPERATION = register(
    Operation(
        "crop",
        CropParams,
        run,
        "Cut each image's detected products out into an image table.",
        inputs=("detector", "table"),
        outputs=("out",),
        staged_outputs=("out",),
        result_key="out",
        module="sparkvision.detect.crop",
        summary_keys=("rows", "crops", "fallbacks", "errors", "images_per_s", "elapsed_s"),
    )
)
