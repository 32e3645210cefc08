"""The detection table: an image table whose rows also carry boxes.

Schema (one row per image): every column of the image table (:mod:`sparkvision.data.schema`),
in the same order and with the same meaning, then::

    boxes   array<struct>   the objects in the image, in no particular order; empty when none
        x1, y1, x2, y2   float    pixels of the stored image (``width`` x ``height``): left, top,
                                  right and bottom edges, x to the right, y down (COCO ``xyxy``)
        label            int      index into the table's class names; null when unlabelled
        label_name       string   the class name; null when unlabelled
        item_content_id  string   content id of the image the object was pasted from (scenes
                                  made by ``datasets scenes``); null for annotated photos

Why the item's content id sits inside each box rather than in a parallel ``items`` column: a
box and the item it shows are one fact, and one list cannot fall out of step with another.

A scene row's own ``label``/``label_name`` are those of its largest box (the scene's main
subject, as a product photo has one), so classification and search by class still mean
something on a detection table; ``split`` is the split every item of the scene came from.

A detection table is still an image table: the same ``_sparkvision.json`` (class names), and
:func:`sparkvision.data.table.read_table` reads it (without ``boxes``), so ``train``,
``search`` and ``dedup`` take it unchanged. :func:`read_detection_table` reads the boxes too.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StringType, StructField, StructType

from sparkvision.data.schema import IMAGE_SCHEMA
from sparkvision.data.table import read_meta
from sparkvision.spark import storage

BOX_STRUCT = StructType(
    [
        StructField("x1", FloatType(), False),
        StructField("y1", FloatType(), False),
        StructField("x2", FloatType(), False),
        StructField("y2", FloatType(), False),
        StructField("label", IntegerType(), True),
        StructField("label_name", StringType(), True),
        StructField("item_content_id", StringType(), True),
    ]
)
BOXES_FIELD = StructField("boxes", ArrayType(BOX_STRUCT, containsNull=False), False)
DETECTION_SCHEMA = StructType([*IMAGE_SCHEMA.fields, BOXES_FIELD])

_ARROW_SCALARS = {
    StringType: pa.string(),
    IntegerType: pa.int32(),
    FloatType: pa.float32(),
}


def box_arrow_type() -> pa.DataType:
    """The Arrow type of ``boxes``, for ``mapInArrow`` bodies that produce detection rows."""
    return pa.list_(
        pa.struct([pa.field(f.name, _ARROW_SCALARS[type(f.dataType)]) for f in BOX_STRUCT.fields])
    )


def box_record(
    xyxy: tuple[float, float, float, float],
    label: int | None,
    label_name: str | None,
    item_content_id: str | None = None,
) -> dict[str, Any]:
    """One element of ``boxes``, as Arrow and Spark take it from Python."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    return {
        "x1": x1,
        "y1": y1,
        "x2": x2,
        "y2": y2,
        "label": label,
        "label_name": label_name,
        "item_content_id": item_content_id,
    }


def is_detection_table(spark: SparkSession, table: str) -> bool:
    """An image table whose Parquet files have a ``boxes`` column."""
    read_meta(spark, table)  # a clear error for a path that is not an image table
    return "boxes" in spark.read.parquet(storage.qualify(table)).columns


def read_detection_table(spark: SparkSession, table: str, split: str | None = None) -> DataFrame:
    """The detection table as a DataFrame with ``boxes``, optionally one split only."""
    if not is_detection_table(spark, table):
        raise ValueError(
            f"{table} is an image table without boxes; make one with `sparkvision datasets scenes`"
        )
    df = spark.read.schema(DETECTION_SCHEMA).parquet(storage.qualify(table))
    return df if split is None else df.where(df.split == split)
