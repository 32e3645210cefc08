"""``ingest``: images (a folder, IDX files or an image table) into a Parquet image table."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.data.images import MAX_PIXELS_DEFAULT
from sparkvision.data.ingest import SourceKind, ingest
from sparkvision.data.schema import Split
from sparkvision.fields import CommaList
from sparkvision.ops.base import Cli, Operation, Params, Progress, register


class IngestParams(Params):
    """Images into a Parquet image table; files that cannot go in become reject rows with a reason."""

    source: Annotated[str, Cli(positional=True)] = Field(
        description="Image folder, IDX file/folder or image table (any Spark URI).")
    table: Annotated[str, Cli(positional=True)] = Field(
        description="Output image table (Parquet directory, any Spark URI).")
    kind: SourceKind = Field("auto", description="auto | folder | idx | table")
    split: Split | None = Field(None, description="Force every row into this split (train/test/val/unlabeled).")
    labeled: Annotated[bool, Cli(flags=("--labeled/--unlabeled",))] = Field(
        True, description="Read class folders as labels (--unlabeled ignores them).")
    class_names: CommaList = Field(None, description="Class names for IDX labels 0..N-1 (comma-separated).")
    max_pixels: int = Field(MAX_PIXELS_DEFAULT, ge=1, description=(
        "Reject images with more pixels (decompression bombs), checked from the header."))
    mode: Literal["append", "overwrite"] = Field("append", description=(
        "append (skips content already in the table) | overwrite"))
    rejects: str | None = Field(None, description="Rejects table (default TABLE_rejects).")
    glob: str | None = Field(None, description="Only files whose name matches, e.g. '*.jpg'.")


def run(spark: SparkSession, p: IngestParams, progress: Progress) -> dict[str, Any]:
    return ingest(spark, p.source, p.table, kind=p.kind, split=p.split, labeled=p.labeled, class_names=p.class_names,
                  max_pixels=p.max_pixels, mode=p.mode, rejects=p.rejects, glob=p.glob).to_json()


OPERATION = register(Operation(
    "ingest", IngestParams, run, "Ingest a folder / IDX files / table into an image table.",
    inputs=("source",), outputs=("table",), result_key="table", module="sparkvision.data.ingest",
    summary_keys=("rows_written", "elapsed_s", "images_per_s"),
))
