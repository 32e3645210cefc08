"""``ingest``: images (a folder, IDX files or an image table) into a Parquet image table."""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.data.images import MAX_PIXELS_DEFAULT
from sparkvision.data.ingest import SourceKind, ingest
from sparkvision.data.schema import META_FILE, Split
from sparkvision.fields import CommaList
from sparkvision.ops.base import Cli, Operation, ParamError, Params, Progress, register
from sparkvision.ops.paths import local_path
from sparkvision.spark import storage


class IngestParams(Params):
    """Images into a Parquet image table; files that cannot go in become reject rows with a reason."""

    source: Annotated[str, Cli(positional=True)] = Field(
        description="Image folder, IDX file/folder or image table (any Spark URI)."
    )
    table: Annotated[str, Cli(positional=True)] = Field(
        description="Output image table (Parquet directory, any Spark URI)."
    )
    kind: SourceKind = Field("auto", description="auto | folder | idx | table")
    split: Split | None = Field(
        None, description="Force every row into this split (train/test/val/unlabeled)."
    )
    labeled: Annotated[bool, Cli(flags=("--labeled/--unlabeled",))] = Field(
        True, description="Read class folders as labels (--unlabeled ignores them)."
    )
    class_names: CommaList = Field(None, description="Class names for IDX labels 0..N-1 (comma-separated).")
    max_pixels: int = Field(
        MAX_PIXELS_DEFAULT,
        ge=1,
        description=("Reject images with more pixels (decompression bombs), checked from the header."),
    )
    max_side: int | None = Field(
        None,
        ge=1,
        description=(
            "Store images whose longer side exceeds this many pixels downscaled to it (aspect kept; PNG, or "
            "JPEG quality 95 for JPEG sources); width/height are the stored size, content_id the file's. "
            "Default: images are stored as they came. Folder sources only."
        ),
    )
    overwrite: bool = Field(
        False,
        description=(
            "Replace the table. Without it an existing image table is appended to (content already there is "
            "skipped) and any other existing data is refused."
        ),
    )
    rejects: str | None = Field(None, description="Rejects table (default TABLE_rejects).")
    glob: str | None = Field(None, description="Only files whose name matches, e.g. '*.jpg'.")
    coco: str | None = Field(
        None,
        description=(
            "COCO JSON file (any Spark URI) of boxes for a folder's images: writes a detection table whose "
            "classes are its categories (folder names are then not labels)."
        ),
    )


def run(spark: SparkSession, p: IngestParams, progress: Progress) -> dict[str, Any]:
    return ingest(
        spark,
        p.source,
        p.table,
        kind=p.kind,
        split=p.split,
        labeled=p.labeled,
        class_names=p.class_names,
        max_pixels=p.max_pixels,
        mode="overwrite" if p.overwrite else "append",
        rejects=p.rejects,
        glob=p.glob,
        coco=p.coco,
        max_side=p.max_side,
    ).to_json()


def check(p: IngestParams) -> None:
    if p.coco is not None and p.kind in ("idx", "table"):
        raise ParamError("coco", f"boxes come with a folder of images, not kind {p.kind}")
    if p.coco is not None and p.class_names:
        raise ParamError("class_names", "the COCO file's categories name the classes; leave class_names out")
    if p.max_side is not None and p.kind in ("idx", "table"):
        raise ParamError("max_side", f"resizes a folder's image files, not kind {p.kind}")
    if p.max_side is not None and p.coco is not None:
        raise ParamError(
            "max_side", "the COCO file's boxes are in the images' own pixels; leave max_side out"
        )


def appends_to_image_table(p: Any, out: str, spark: Any) -> bool:
    """Ingest continues an existing image table (appending is its default), and the rejects table
    Spark wrote beside it; any other data is refused."""
    marker = META_FILE if out == p.table else "_SUCCESS"
    local = local_path(out)
    if local is not None:
        return os.path.isfile(os.path.join(local, marker))
    return spark is not None and storage.exists(spark, storage.join(out, marker))


OPERATION = register(
    Operation(
        "ingest",
        IngestParams,
        run,
        "Ingest a folder / IDX files / table into an image table.",
        inputs=("source",),
        optional_inputs=("coco",),
        outputs=("table", "rejects"),
        result_key="table",
        module="sparkvision.data.ingest",
        continues=appends_to_image_table,
        check=check,
        summary_keys=("rows_written", "elapsed_s", "images_per_s"),
    )
)
