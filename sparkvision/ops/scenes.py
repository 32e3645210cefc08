"""``datasets scenes``: a detection table of cluttered scenes, with boxes, from any image table."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.errors import ParamError
from sparkvision.fields import OptionalSplit
from sparkvision.ops.base import Operation, Progress, params_model, register
from sparkvision.ops.fields import overwrite, positional

MAX_ITEMS = 5

ScenesParams = params_model(
    "ScenesParams",
    "Scenes with boxes from an image table: each pastes min..max items, scaled to cover 5-60% of the scene, "
    "onto a cluttered background (gradients, blob textures, noise, distractor shapes). A scene's items come "
    "from one split, which it keeps. Writes a detection table (docs/detection.md).",
    source=positional("Image table whose rows are the items.", "SOURCE_TABLE"),
    out=positional("Detection table to write.", "OUT"),
    scenes_per_item=(
        int,
        Field(
            1, ge=1, le=100, description="Scenes each item appears in (each pass groups the items afresh)."
        ),
    ),
    min_items=(int, Field(1, ge=1, le=MAX_ITEMS, description="Fewest items in a scene.")),
    max_items=(int, Field(3, ge=1, le=MAX_ITEMS, description="Most items in a scene.")),
    size=(int, Field(128, ge=32, le=2048, description="Side of the square scenes, in pixels.")),
    seed=(int, Field(0, ge=0, description="Same seed and source, same scenes (on any cluster).")),
    split=(OptionalSplit, Field(None, description="Only items of this split (default: every split).")),
    paste=(
        Literal["mask", "rect"],
        Field(
            "mask",
            description=(
                "mask: paste only the item's pixels that differ from its border colour (a garment, not its "
                "black square); rect: paste the whole item image."
            ),
        ),
    ),
    format=(
        Literal["PNG", "JPEG"],
        Field("PNG", description="Encoding of the scenes: PNG | JPEG (quality 90)."),
    ),
    overwrite=overwrite(),
)


def check(p: Any) -> None:
    if p.min_items > p.max_items:
        raise ParamError("min_items", f"{p.min_items} is more than max_items {p.max_items}")


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.detect.scene_table import make_scenes

    try:
        return make_scenes(
            spark,
            p.source,
            p.out,
            scenes_per_item=p.scenes_per_item,
            min_items=p.min_items,
            max_items=p.max_items,
            size=p.size,
            seed=p.seed,
            split=p.split,
            paste=p.paste,
            fmt=p.format,
        )
    except FileNotFoundError as e:  # not an image table
        raise ParamError("source", str(e)) from None
    except ValueError as e:  # no rows (in that split)
        raise ParamError("source", str(e)) from None


# Not a web job kind yet: the web's detection pages come with the detector.
OPERATION = register(
    Operation(
        "scenes",
        ScenesParams,
        run,
        "Scenes with boxes (a detection table) from an image table.",
        inputs=("source",),
        outputs=("out",),
        staged_outputs=("out",),
        result_key="out",
        module="sparkvision.detect.scene_table",
        web=False,
        check=check,
        summary_keys=("scenes", "source_rows", "items_used", "scenes_per_s", "elapsed_s"),
    )
)
