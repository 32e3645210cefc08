"""Ingest images into a Parquet image table, on the executors.

Sources: image folders (``root/<class>/*``, ``root/<split>/<class>/*`` or flat), IDX files and
existing image tables (:mod:`sparkvision.data.sources`). Files are read with Spark's own
``binaryFile`` source, so any URI Spark reads works, and decoded in Arrow batches on the executors
(:mod:`sparkvision.data.decode`); nothing but counts and class names comes back to the driver.
This module deduplicates, assigns label indices and writes the table, its rejects and the summary.

Bad input never fails the job: every file that cannot go in lands in the rejects table with a
reason (see :data:`sparkvision.data.schema.REJECT_REASONS`), so every file under the source is a
row or a reject. Directory symlinks are never followed (:mod:`sparkvision.data.listing`).

With a COCO file (``coco=``) a folder comes in as a detection table: each row gets the boxes the
file gives it (:mod:`sparkvision.data.coco`), and the categories are the class names.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F

from sparkvision.data.coco import boxes_attached, read_coco
from sparkvision.data.detection import is_detection_table
from sparkvision.data.images import MAX_PIXELS_DEFAULT
from sparkvision.data.schema import SPLITS, TABLE_SCHEMA
from sparkvision.data.sources import (
    DecodedStats,
    decode_folder,
    decode_idx,
    decode_table,
    decoded_stats,
    detect_source_kind,
    qualified_root,
)
from sparkvision.data.table import TableMeta, is_image_table, merge_class_names, read_meta, write_meta
from sparkvision.errors import ParamError
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress

SourceKind = Literal["auto", "folder", "idx", "table"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)


@dataclass
class IngestSummary:
    table: str
    rejects_table: str
    source: str
    source_kind: str
    rows_written: int = 0
    rows_by_split: dict[str, int] = field(default_factory=dict)
    rows_by_class: dict[str, int] = field(default_factory=dict)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    duplicates_in_source: int = 0
    duplicates_of_table: int = 0
    class_names: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    coco: dict[str, Any] | None = None  # what the COCO file matched and what it dropped (--coco)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ingest(
    spark: SparkSession,
    source: str,
    table: str,
    *,
    kind: SourceKind = "auto",
    split: str | None = None,
    labeled: bool = True,
    class_names: list[str] | None = None,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    mode: str = "append",
    rejects: str | None = None,
    glob: str | None = None,
    coco: str | None = None,
    on_listed: Callable[[], None] | None = None,
    max_side: int | None = None,
) -> IngestSummary:
    """Ingest ``source`` into the image table ``table`` and write rejects beside it.

    ``mode="append"`` adds to an existing table, skipping content already there; ``"overwrite"``
    replaces it. ``coco`` names a COCO JSON file whose boxes the folder's images get (the table
    is then a detection table). ``on_listed`` runs between listing a folder and reading its files
    (tests remove files there to see them rejected as unreadable). ``max_side``: a folder's images
    with a longer side are stored downscaled to it (:func:`~sparkvision.data.images.shrink`); their
    content id stays that of the file, so re-ingesting a file finds it whatever the size stored.
    """
    if kind not in SOURCE_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode {mode!r} must be 'append' or 'overwrite'")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_side is not None and max_side <= 0:
        raise ParamError("max_side", f"must be a positive number of pixels, got {max_side}")
    if max_side is not None and coco is not None:
        raise ParamError(
            "max_side", "the COCO file's boxes are in the images' own pixels; leave max_side out"
        )
    if not storage.exists(spark, source):
        raise FileNotFoundError(f"source {source} does not exist")
    if coco is not None and class_names:
        raise ParamError("class_names", "the COCO file's categories name the classes; leave class_names out")
    timer = Timer()
    table_q = storage.qualify(table)
    rejects_q = storage.qualify(rejects or table.rstrip("/") + "_rejects")
    if kind == "auto":
        kind = detect_source_kind(spark, source)
    if coco is not None and kind != "folder":
        raise ParamError("coco", f"boxes come with a folder of images; {source} is read as {kind}")
    if max_side is not None and kind != "folder":
        raise ParamError("max_side", f"resizes a folder's image files; {source} is read as {kind}")
    summary = IngestSummary(table=table_q, rejects_table=rejects_q, source=source, source_kind=kind)

    existing: TableMeta | None = None
    if mode == "append" and is_image_table(spark, table):
        existing = read_meta(spark, table)
        check_boxes_agree(spark, table, coco is not None)
    boxes = read_coco(spark, coco) if coco is not None else None  # before any image is read

    stats: DecodedStats | None = None  # the decoded rows' counts, where the decoding job made them
    with spark_progress(spark, f"ingest {kind}"), ExitStack() as cached:
        if kind == "folder":
            decoded, unreadable, names, stats = decode_folder(
                spark, source, split, labeled and boxes is None, max_pixels, glob, on_listed, max_side
            )
            if boxes is not None:
                stats = None  # attaching boxes rejects rows: counted again
                # decode_folder cached the rows; _finish caches them again with their boxes.
                cached.callback(decoded.unpersist)
                root = qualified_root(spark, source)
                decoded, summary.coco = cached.enter_context(boxes_attached(decoded, root, boxes, split))
                names = boxes.class_names
        elif kind == "idx":
            decoded, names = decode_idx(spark, source, split, class_names)
            unreadable = None
        else:
            decoded, names = decode_table(spark, source)
            unreadable = None
        names = list(class_names) if class_names else names
        all_names = merge_class_names(existing.class_names if existing else [], names)
        _finish(spark, summary, decoded, unreadable, all_names, existing is not None, mode, stats)

    sources = (existing.sources if existing else []) + [source]
    write_meta(spark, table, TableMeta(class_names=all_names, sources=sources))
    summary.class_names = all_names
    summary.elapsed_s = round(timer.elapsed, 3)
    total = summary.rows_written + sum(summary.rejects_by_reason.values())
    summary.images_per_s = round(total / max(timer.elapsed, 1e-9), 1)
    return summary


def check_boxes_agree(spark: SparkSession, table: str, with_boxes: bool) -> None:
    """Rows appended to a table have its columns: boxes only into a detection table, and a
    detection table only rows with their boxes (a row without them would claim "no objects")."""
    has_boxes = is_detection_table(spark, table)
    if with_boxes and not has_boxes:
        raise ParamError(
            "coco", f"{table} is an image table without boxes; write to a new table or overwrite it"
        )
    if has_boxes and not with_boxes:
        raise ParamError(
            "table",
            f"{table} is a detection table: add images to it with their boxes (coco), or overwrite it",
        )


def _finish(
    spark: SparkSession,
    summary: IngestSummary,
    decoded: DataFrame,
    unreadable: DataFrame | None,
    class_names: list[str],
    table_exists: bool,
    mode: str,
    stats: DecodedStats | None = None,
) -> None:
    """Deduplicate, assign label indices, write rows and rejects, and fill in the summary.

    ``stats`` are the decoded rows' counts when the caller has them (:func:`decoded_stats`).
    Rows are ranked by content id (a shuffle and a sort) only when they hold a duplicate, or when
    appending, where each first copy is looked up in the table; duplicates are found on
    (content_id, path) alone, so image bytes are never shuffled, and only the (usually short)
    list of paths to drop is joined back. The counts of the summary come from ``stats``, the
    drops and the unreadable files, so no job runs only to count.
    """
    decoded = decoded.persist(StorageLevel.MEMORY_AND_DISK)
    stats = stats or decoded_stats(decoded)  # fills the cache
    good = decoded.where(F.col("reason").isNull())
    appending = table_exists and mode == "append"
    drops: DataFrame | None = None
    drop_counts: list[Row] = []
    if stats.duplicates or appending:
        drops = _drops(spark, summary.table, good, stats.duplicates, appending)
        drops = drops.persist(StorageLevel.MEMORY_AND_DISK)
        drop_counts = drops.groupBy("split", "label_name", "detail").count().collect()
    keep = good
    if drops is not None and drop_counts:
        keep = good.join(F.broadcast(drops.select("path")), "path", "left_anti")

    label_map = F.create_map(*[x for i, n in enumerate(class_names) for x in (F.lit(n), F.lit(i))])

    def label_of(name: Column) -> Column:
        return (label_map[name] if class_names else F.lit(None)).cast("int")

    columns = {c: F.col(c) for c in TABLE_SCHEMA.fieldNames()}
    columns["label"] = label_of(F.col("label_name"))
    if "boxes" in decoded.columns:  # a box's label is its class name's index, like the row's
        columns["boxes"] = F.transform("boxes", lambda b: b.withField("label", label_of(b["label_name"])))
    rows = keep.select(*[col.alias(c) for c, col in columns.items()])

    # Rejects are written before the rows: writing the table makes Spark re-cache every plan that
    # reads it, and the "already in the table" drops would then count this ingest's own rows.
    reject_parts = [
        decoded.where(F.col("reason").isNotNull()).select("path", "reason", "detail", "size_bytes")
    ]
    reject_counts: dict[str, int] = {}
    for _split, _name, reason, n in stats.counts:
        if reason is not None:
            reject_counts[reason] = reject_counts.get(reason, 0) + n
    if drops is not None:
        reject_parts.append(drops.select("path", "reason", "detail", "size_bytes"))
        if drop_counts:
            reject_counts["duplicate"] = reject_counts.get("duplicate", 0) + sum(
                r["count"] for r in drop_counts
            )
    if unreadable is not None:
        reject_parts.append(unreadable)
        for r in unreadable.groupBy("reason").count().collect():  # rows made on the driver: a few
            reject_counts[r.reason] = reject_counts.get(r.reason, 0) + r["count"]
    rejects = reject_parts[0]
    for part in reject_parts[1:]:
        rejects = rejects.unionByName(part)
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    rejects = rejects.withColumn("source", F.lit(summary.source)).withColumn("ingested_at", F.lit(stamp))
    if reject_counts or not storage.exists(spark, summary.rejects_table):
        rejects.coalesce(1).write.mode("append").parquet(summary.rejects_table)
    rows.write.mode(mode).parquet(summary.table)
    if drops is not None:
        drops.unpersist()
    decoded.unpersist()

    by_split: dict[str, int] = {}
    by_class: dict[str, int] = {}

    def add(split: str, name: str | None, n: int) -> None:
        by_split[split] = by_split.get(split, 0) + n
        key = name if name is not None else "(unlabeled)"
        by_class[key] = by_class.get(key, 0) + n

    for split_, name, reason, n in stats.counts:
        if reason is None:
            add(split_, name, n)
    for r in drop_counts:
        add(r.split, r.label_name, -r["count"])
        if r.detail == "content already in the table":
            summary.duplicates_of_table += r["count"]
        else:
            summary.duplicates_in_source += r["count"]
    summary.rows_by_split = {k: v for k, v in sorted(by_split.items()) if v}
    summary.rows_by_class = {k: v for k, v in sorted(by_class.items()) if v}
    summary.rows_written = sum(by_split.values())
    summary.rejects_by_reason = dict(sorted(reject_counts.items()))


def _drops(spark: SparkSession, table: str, good: DataFrame, in_source: bool, appending: bool) -> DataFrame:
    """Rows not to write: later copies of content seen in this source (``in_source``: the first
    by path is kept) and, when ``appending``, content already in ``table``."""
    columns = ["path", "reason", "detail", "size_bytes", "split", "label_name"]
    meta = good.select("content_id", "path", "size_bytes", "split", "label_name")
    parts = []
    if in_source:
        w = Window.partitionBy("content_id").orderBy("path")
        meta = meta.withColumn("_rank", F.row_number().over(w)).withColumn("_first", F.first("path").over(w))
        parts.append(
            meta.where(F.col("_rank") > 1).select(
                *columns[:1],
                F.lit("duplicate").alias("reason"),
                F.concat(F.lit("same content as "), F.col("_first")).alias("detail"),
                *columns[3:],
            )
        )
        meta = meta.where(F.col("_rank") == 1)
    if appending:
        existing_ids = spark.read.parquet(table).select("content_id")
        parts.append(
            meta.join(existing_ids, "content_id", "left_semi").select(
                *columns[:1],
                F.lit("duplicate").alias("reason"),
                F.lit("content already in the table").alias("detail"),
                *columns[3:],
            )
        )
    drops = parts[0]
    for part in parts[1:]:
        drops = drops.unionByName(part)
    return drops
