"""Boxes from a COCO-style JSON file, joined onto the images of a folder as ``ingest`` reads it.

The JSON is read by Spark (``multiLine``), not by the driver, and matched to the listed files by
a DataFrame join: only the category names (the table's class names) and a few counts come back.
Spark parses one multi-line JSON document in one task, so a very large file (COCO's own
train2017 is 450 MB) needs an executor with memory to match.

The rules, which ``docs/detection.md`` states for users:

- **Matching.** An entry of ``images`` belongs to the file whose path relative to the ingest
  source equals its ``file_name``; a ``file_name`` without a directory also matches a file of that
  name anywhere under the source when no other file there has the same name.
- **Classes** are the ``categories`` in order of ``id``; a box's label is its category's index.
- **Boxes** are COCO's ``bbox = [x, y, width, height]`` in pixels, stored as edges
  ``x1 = x, y1 = y, x2 = x + width, y2 = y + height``, clipped to the image; one with no area left
  (or not four numbers, or of an unknown category) is dropped and counted, as is every crowd
  region (``iscrowd: 1``: many objects in one outline, which COCO's own evaluation ignores).
- **Pixels.** Ingest stores each file's bytes as they are; every reader decodes them upright
  (the EXIF orientation applied, ``images.upright``) and the table records the upright size, so
  boxes must be in the upright view, as annotation tools show it. An image whose
  ``width``/``height`` in the JSON differ from the table's (a resized copy, or a tool that
  annotated the sideways stored grid) becomes a ``coco_size_mismatch`` reject rather than a row
  whose boxes point at the wrong pixels. (A 180-degree turn keeps the size and is not caught.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DataType, StructType

from sparkvision.data.detection import BOX_STRUCT
from sparkvision.data.schema import SPLITS
from sparkvision.errors import ParamError
from sparkvision.spark import storage

SIZE_MISMATCH = "coco_size_mismatch"
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "bbox", "category_id"),
    "categories": ("id", "name"),
}
OPTIONAL_KEYS: dict[str, dict[str, str]] = {
    "images": {"width": "int", "height": "int"},
    "annotations": {"iscrowd": "int"},
}
# What an empty list stands for (Spark infers ``array<string>`` for ``[]``).
EMPTY_SCHEMAS = {
    "images": "id string, file_name string",
    "annotations": "image_id string, bbox array<double>, category_id long",
    "categories": "id long, name string",
}
EXAMPLES = 5  # unmatched file names shown in the summary


@dataclass
class Coco:
    """A COCO file as DataFrames: ``images`` (image_id, file_name, coco_width, coco_height) and
    ``annotations`` (image_id, bbox, category_id, iscrowd), with the class names it defines."""

    uri: str
    class_names: list[str]
    category_ids: list[int]
    images: DataFrame
    annotations: DataFrame


def schema_problem(schema: StructType) -> str | None:
    """What keeps ``schema`` (as Spark inferred it from the file) from being COCO, or None.

    An empty list is inferred as ``array<string>``: the caller checks such lists really are empty.
    """
    if "_corrupt_record" in schema.fieldNames():
        return "is not valid JSON (or not one JSON object)"
    for key, needed in REQUIRED_KEYS.items():
        if key not in schema.fieldNames():
            return f"has no {key!r} list"
        kind = schema[key].dataType
        if not isinstance(kind, ArrayType):
            return f"{key!r} is not a list"
        element: DataType = kind.elementType
        if isinstance(element, StructType):
            missing = [k for k in needed if k not in element.fieldNames()]
            if missing:
                return f"{key!r} entries lack {', '.join(repr(k) for k in missing)}"
    return None


def read_coco(spark: SparkSession, uri: str) -> Coco:
    """The COCO file at ``uri`` (any URI Spark reads); one :class:`ParamError` line naming
    ``coco`` when it is not valid JSON or lacks COCO's keys."""
    try:
        raw = spark.read.option("multiLine", "true").json(storage.qualify(uri))
        problem = schema_problem(raw.schema)
    except AnalysisException as e:  # not found, not readable
        raise ParamError("coco", f"{uri} cannot be read: {str(e).splitlines()[0]}") from None
    if problem:
        raise ParamError("coco", f"{uri} {problem}")
    lists = {key: _entries(raw, key, uri) for key in REQUIRED_KEYS}
    cats = lists["categories"].select(
        F.col("id").try_cast("long").alias("category_id"), F.col("name").cast("string").alias("name")
    )
    rows = sorted(cats.collect(), key=lambda r: (r.category_id is None, r.category_id or 0))  # class names
    names = [r.name for r in rows]
    bad = [r for r in rows if r.category_id is None or not r.name]
    if bad:
        raise ParamError("coco", f"{uri}: every category needs an integer 'id' and a 'name' ({bad[0]})")
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ParamError("coco", f"{uri}: category name {dup!r} is used twice")
    images = lists["images"].select(
        F.col("id").cast("string").alias("image_id"),
        F.col("file_name").cast("string").alias("file_name"),
        *[_optional(lists["images"], k, t).alias(f"coco_{k}") for k, t in OPTIONAL_KEYS["images"].items()],
    )
    anns = lists["annotations"].select(
        F.col("image_id").cast("string").alias("image_id"),
        F.col("bbox").try_cast("array<double>").alias("bbox"),
        F.col("category_id").try_cast("long").alias("category_id"),
        F.coalesce(_optional(lists["annotations"], "iscrowd", "int"), F.lit(0)).alias("iscrowd"),
    )
    return Coco(uri, names, [r.category_id for r in rows], images, anns)


def _entries(raw: DataFrame, key: str, uri: str) -> DataFrame:
    """One row per entry of the list ``key``; an empty list gives no rows (whatever Spark inferred)."""
    kind = raw.schema[key].dataType
    assert isinstance(kind, ArrayType)
    if not isinstance(kind.elementType, StructType):
        longest = raw.select(F.max(F.size(key))).first()
        if longest is not None and (longest[0] or 0) > 0:
            raise ParamError("coco", f"{uri}: {key!r} entries are not objects")
        return raw.sparkSession.createDataFrame([], EMPTY_SCHEMAS[key])
    return raw.select(F.explode(key).alias("e")).select("e.*")


def _optional(df: DataFrame, key: str, kind: str) -> Column:
    return F.col(key).try_cast(kind) if key in df.columns else F.lit(None).cast(kind)


def coco_split(root: str, split: str | None) -> Column:
    """A row's split with COCO boxes: the forced one, else its split directory, else ``train``
    (an image with no boxes is a negative example, not an unlabelled one)."""
    parts = F.split(F.expr(f"substring(path, {len(root) + 2})"), "/")
    first = F.lower(F.element_at(parts, 1))
    from_dir = F.when((F.size(parts) >= 2) & first.isin(*SPLITS), first)
    return F.coalesce(F.lit(split).cast("string"), from_dir, F.lit("train"))


def match_images(coco: Coco, files: DataFrame, root: str) -> DataFrame:
    """Every COCO image with the file it names (``path``, ``width``, ``height``; null when none):
    the path relative to ``root``, or a bare name that only one file under ``root`` has."""
    rel = F.expr(f"substring(path, {len(root) + 2})")
    files = files.select("path", "width", "height", rel.alias("rel"))
    files = files.withColumn("base", F.element_at(F.split("rel", "/"), -1))
    geometry = ("path", "rel", "width", "height")
    by_base = files.groupBy("base").agg(F.count("*").alias("n"), *[F.first(c).alias(c) for c in geometry])
    keys = files.select(F.col("rel").alias("key"), "path", "width", "height").unionByName(
        by_base.where("n = 1 AND base != rel").select(F.col("base").alias("key"), "path", "width", "height")
    )
    return coco.images.join(keys, coco.images.file_name == keys.key, "left").drop("key")


@contextmanager
def boxes_attached(
    decoded: DataFrame, root: str, coco: Coco, split: str | None
) -> Iterator[tuple[DataFrame, dict[str, Any]]]:
    """``decoded`` (folder rows, :data:`~sparkvision.data.decode.DECODED_SCHEMA`) with ``boxes``
    from ``coco``, its split and label set for boxes (the largest box's class), size mismatches
    turned into rejects; and the counts for the ingest summary.

    Box labels are left null here: ingest sets them from the final class names, which an
    appended table may order differently. The matched annotations (no image bytes) stay cached
    until the block ends, so that writing the rows does not parse the file again.
    """
    spark = decoded.sparkSession
    files = decoded.where(F.col("reason").isNull())
    matched = match_images(coco, files, root)
    mismatch = (
        F.col("path").isNotNull()
        & (F.col("coco_width") > 0)
        & (F.col("coco_height") > 0)
        & ((F.col("coco_width") != F.col("width")) | (F.col("coco_height") != F.col("height")))
    )
    matched = matched.withColumn("mismatch", F.coalesce(mismatch, F.lit(False))).persist()

    cats = spark.createDataFrame(
        list(zip(coco.category_ids, coco.class_names, strict=True)), "category_id long, cat_name string"
    )
    a = coco.annotations.join(
        matched.where(F.col("path").isNotNull()).select("image_id", "path", "width", "height", "mismatch"),
        "image_id",
        "left",
    ).join(F.broadcast(cats), "category_id", "left")
    x, y, w, h = (F.try_element_at("bbox", F.lit(i)) for i in range(1, 5))
    x1 = F.greatest(F.lit(0.0), F.least(x, F.col("width")))
    y1 = F.greatest(F.lit(0.0), F.least(y, F.col("height")))
    x2 = F.greatest(F.lit(0.0), F.least(x + w, F.col("width")))
    y2 = F.greatest(F.lit(0.0), F.least(y + h, F.col("height")))
    a = a.select(
        "path",
        "cat_name",
        x1.alias("x1"),
        y1.alias("y1"),
        x2.alias("x2"),
        y2.alias("y2"),
        *[
            F.when(F.col("path").isNull(), "unmatched")
            .when(F.col("iscrowd") == 1, "crowd")
            .when(F.col("mismatch"), "on_rejected_image")
            .when(F.col("cat_name").isNull() | (F.size("bbox") != 4), "invalid")
            .when(F.coalesce((x2 > x1) & (y2 > y1), F.lit(False)), "kept")
            .otherwise("invalid")
            .alias("status")
        ],
    ).persist()

    box = F.struct(
        *[F.col(c).cast("float").alias(c) for c in ("x1", "y1", "x2", "y2")],
        F.lit(None).cast("int").alias("label"),
        F.col("cat_name").alias("label_name"),
        F.lit(None).cast("string").alias("item_content_id"),
    )
    area = (F.col("x2") - F.col("x1")) * (F.col("y2") - F.col("y1"))
    detail = F.format_string(
        "the COCO file says %dx%d, the file is %dx%d: boxes would point at the wrong pixels "
        "(a resized copy, or annotated with EXIF rotation applied?)",
        "coco_width",
        "coco_height",
        "width",
        "height",
    )
    kept = a.where(F.col("status") == "kept").select(
        "path", box.alias("box"), "cat_name", area.alias("area"), F.lit(None).cast("string").alias("why")
    )
    rejected = matched.where("mismatch").select(
        "path",
        F.lit(None).cast(BOX_STRUCT).alias("box"),
        F.lit(None).cast("string").alias("cat_name"),
        F.lit(None).cast("double").alias("area"),
        detail.alias("why"),
    )
    per_path = (
        kept.unionByName(rejected)
        .groupBy("path")
        .agg(
            F.collect_list("box").alias("coco_boxes"),  # skips the rejected images' null
            F.max_by("cat_name", "area").alias("coco_label"),
            F.max("why").alias("coco_reject"),
        )
    )

    empty = F.array().cast(ArrayType(BOX_STRUCT, containsNull=False))
    new_split = coco_split(root, split)
    rejected_here = F.col("reason").isNull() & F.col("coco_reject").isNotNull()
    replace = {
        "split": new_split,
        "label_name": F.when(new_split != "unlabeled", F.col("coco_label")),
        "reason": F.when(rejected_here, F.lit(SIZE_MISMATCH)).otherwise(F.col("reason")),
        "detail": F.when(rejected_here, F.col("coco_reject")).otherwise(F.col("detail")),
    }
    out = decoded.join(per_path, "path", "left").select(
        *[replace.get(c, F.col(c)).alias(c) for c in decoded.columns],
        F.coalesce("coco_boxes", empty).alias("boxes"),
    )
    try:
        yield out, _counts(coco, matched, a)
    finally:
        a.unpersist()
        matched.unpersist()


def _counts(coco: Coco, matched: DataFrame, a: DataFrame) -> dict[str, Any]:
    """The ``coco`` part of the ingest summary: one small job over the annotations and images (no
    image bytes), and one more for a few names when some images matched no file."""
    image_status = F.when(F.col("path").isNull(), "image_unmatched").when(F.col("mismatch"), "image_mismatch")
    n = {
        r.status: r["count"]
        for r in a.select(F.concat(F.lit("annotation_"), "status").alias("status"))
        .unionByName(matched.select(F.coalesce(image_status, F.lit("image_matched")).alias("status")))
        .groupBy("status")
        .count()
        .collect()
    }
    unmatched = n.get("image_unmatched", 0)
    examples = (
        [
            r.file_name
            for r in matched.where(F.col("path").isNull()).select("file_name").limit(EXAMPLES).collect()
        ]
        if unmatched
        else []
    )
    mismatch = n.get("image_mismatch", 0)
    return {
        "file": coco.uri,
        "images": n.get("image_matched", 0) + mismatch + unmatched,
        "images_matched": n.get("image_matched", 0) + mismatch,
        "images_unmatched": unmatched,
        "unmatched_examples": examples,
        "images_size_mismatch": mismatch,
        "annotations": sum(v for k, v in n.items() if k.startswith("annotation_")),
        "boxes": n.get("annotation_kept", 0),
        "annotations_unmatched": n.get("annotation_unmatched", 0),
        "annotations_crowd": n.get("annotation_crowd", 0),
        "annotations_invalid": n.get("annotation_invalid", 0),
        "annotations_on_rejected_images": n.get("annotation_on_rejected_image", 0),
    }
