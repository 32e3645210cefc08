"""Ingest images into a Parquet image table, on the executors.

Sources: image folders (``root/<class>/*``, ``root/<split>/<class>/*`` or flat), IDX files and
existing image tables. Files are read with Spark's own ``binaryFile`` source, so any URI Spark
reads works, and decoded in Arrow batches on the executors; nothing but counts and class names
comes back to the driver.

Bad input never fails the job: every file that cannot go in lands in the rejects table with a
reason (see :data:`sparkvision.data.schema.REJECT_REASONS`).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args
from urllib.parse import unquote

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from sparkvision.spark import storage
from sparkvision.data.idx import FASHION_MNIST_CLASSES, looks_like_idx, pair_idx_files, parse_idx
from sparkvision.data.images import MAX_PIXELS_DEFAULT, RejectError, content_id, encode_png, inspect_image
from sparkvision.spark.progress import Timer, spark_progress
from sparkvision.data.schema import IMAGE_SCHEMA, SPLITS
from sparkvision.data.table import TableMeta, is_image_table, merge_class_names, read_meta, read_table, write_meta

# Decoded rows before label indices are assigned: the image columns plus why a row was rejected.
# Every column is nullable: a rejected row has no content id, bytes or geometry, and Spark trusts
# a declared non-null column (a null there fails the task with a NullPointerException).
DECODED_SCHEMA = StructType(
    [StructField(f.name, f.dataType, True) for f in IMAGE_SCHEMA.fields if f.name != "label"]
    + [
        StructField("reason", StringType(), True),
        StructField("detail", StringType(), True),
        StructField("size_bytes", LongType(), True),
    ]
)

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- executor-side code


def _decode_batches(max_pixels: int) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: (path, content, split, label_name) -> DECODED_SCHEMA rows."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            cols = batch.to_pydict()
            out: dict[str, list] = {f.name: [] for f in DECODED_SCHEMA.fields}
            for path, data, split, label_name in zip(
                cols["path"], cols["content"], cols["split"], cols["label_name"], strict=True
            ):
                data = data or b""
                try:
                    info = inspect_image(data, max_pixels)
                    row = (content_id(data), data, info.format, info.height, info.width, info.channels, None, None)
                except RejectError as e:
                    row = (None, None, None, None, None, None, e.reason, e.detail)
                cid, img, fmt, h, w, c, reason, detail = row
                out["content_id"].append(cid)
                out["path"].append(path)
                out["image"].append(img)
                out["format"].append(fmt)
                out["height"].append(h)
                out["width"].append(w)
                out["channels"].append(c)
                out["label_name"].append(label_name if split != "unlabeled" else None)
                out["split"].append(split)
                out["reason"].append(reason)
                out["detail"].append(detail)
                out["size_bytes"].append(len(data))
            yield pa.RecordBatch.from_pydict(out, schema=_arrow_schema(DECODED_SCHEMA))

    return run


def _arrow_schema(schema: StructType) -> pa.Schema:
    mapping = {StringType: pa.string(), BinaryType: pa.binary(), IntegerType: pa.int32(), LongType: pa.int64()}
    return pa.schema([pa.field(f.name, mapping[type(f.dataType)], nullable=True) for f in schema.fields])


IDX_RAW_SCHEMA = StructType(
    [
        StructField("path", StringType(), False),
        StructField("split", StringType(), False),
        StructField("label", IntegerType(), True),
        StructField("pixels", BinaryType(), False),
        StructField("height", IntegerType(), False),
        StructField("width", IntegerType(), False),
        StructField("channels", IntegerType(), False),
    ]
)


def _parse_idx_batches(
    pairs: list[tuple[str, str, str | None]], chunk: int = 4096
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow body: the raw IDX files (one task sees all of them) -> one row per record."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        files: dict[str, bytes] = {}
        for batch in batches:
            d = batch.to_pydict()
            files.update(zip(d["path"], d["content"], strict=True))
        by_name = {p.rsplit("/", 1)[-1]: p for p in files}
        for split, images_name, labels_name in pairs:
            images_path = by_name[images_name]
            images = parse_idx(files[images_path], images_name)
            if images.dtype != "uint8" or images.ndim not in (3, 4):
                raise ValueError(f"{images_name}: expected uint8 images of shape (N,H,W[,C]), got {images.shape}")
            labels = None
            if labels_name is not None:
                labels = parse_idx(files[by_name[labels_name]], labels_name).astype("int32")
                if len(labels) != len(images):
                    raise ValueError(f"{labels_name}: {len(labels)} labels for {len(images)} images")
            n, h, w = images.shape[:3]
            c = images.shape[3] if images.ndim == 4 else 1
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                count = stop - start
                yield pa.RecordBatch.from_pydict(
                    {
                        "path": [f"{images_path}#{i}" for i in range(start, stop)],
                        "split": [split] * count,
                        "label": [None] * count if labels is None else labels[start:stop].tolist(),
                        "pixels": [images[i].tobytes() for i in range(start, stop)],
                        "height": [h] * count,
                        "width": [w] * count,
                        "channels": [c] * count,
                    },
                    schema=_arrow_schema(IDX_RAW_SCHEMA),
                )

    return run


def _encode_idx_batches(class_names: list[str]) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    import numpy as np

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            d = batch.to_pydict()
            out: dict[str, list] = {f.name: [] for f in DECODED_SCHEMA.fields}
            for path, split, label, pixels, h, w, c in zip(
                d["path"], d["split"], d["label"], d["pixels"], d["height"], d["width"], d["channels"], strict=True
            ):
                arr = np.frombuffer(pixels, dtype=np.uint8).reshape((h, w) if c == 1 else (h, w, c))
                png = encode_png(arr)
                out["content_id"].append(content_id(png))
                out["path"].append(path)
                out["image"].append(png)
                out["format"].append("PNG")
                out["height"].append(h)
                out["width"].append(w)
                out["channels"].append(c)
                if label is not None and not 0 <= label < len(class_names):
                    name = str(label)
                else:
                    name = None if label is None else class_names[label]
                out["label_name"].append(name)
                out["split"].append(split)
                out["reason"].append(None)
                out["detail"].append(None)
                out["size_bytes"].append(len(png))
            yield pa.RecordBatch.from_pydict(out, schema=_arrow_schema(DECODED_SCHEMA))

    return run


# --------------------------------------------------------------------------- layout rules


def _layout_columns(df: DataFrame, root: str, split: str | None, labeled: bool) -> DataFrame:
    """Add ``split`` and ``label_name`` from each file's path relative to ``root``.

    ``root/<split>/<class>/...`` when the first directory is a split name, else
    ``root/<class>/...``; files directly under ``root`` (or under a split directory) are unlabelled.
    An explicit ``split`` wins over split directories.
    """
    rel = F.expr(f"substring(path, {len(root) + 2})")
    parts = F.split(rel, "/")
    first = F.lower(F.element_at(parts, 1))
    has_split_dir = (F.size(parts) >= 2) & first.isin(*SPLITS)
    rest = F.when(has_split_dir, F.slice(parts, 2, 1_000_000)).otherwise(parts)
    dir_split = F.when(has_split_dir, first)
    label = F.when(F.size(rest) >= 2, F.element_at(rest, 1)) if labeled else F.lit(None).cast("string")
    split_col = F.coalesce(F.lit(split) if split else F.lit(None).cast("string"), dir_split)
    split_col = F.coalesce(split_col, F.when(label.isNull(), F.lit("unlabeled")).otherwise(F.lit("train")))
    label = F.when(split_col == "unlabeled", F.lit(None).cast("string")).otherwise(label)
    return df.withColumn("split", split_col).withColumn("label_name", label)


def qualified_root(spark: SparkSession, uri: str) -> str:
    """The root as Spark spells the paths it lists (``file:/x``, not ``file:///x``)."""
    jvm = spark.sparkContext._jvm
    p = jvm.org.apache.hadoop.fs.Path(storage.qualify(uri))
    fs = p.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return str(fs.makeQualified(p).toString()).rstrip("/")


# --------------------------------------------------------------------------- drivers


def detect_source_kind(spark: SparkSession, source: str) -> str:
    if is_image_table(spark, source):
        return "table"
    if looks_like_idx(source):
        return "idx"
    # A sample of file names from Spark's file index: no job runs, no file is opened.
    names = _binary_reader(spark, None).load(storage.qualify(source)).inputFiles()[:1000]
    if names and all(looks_like_idx(n) for n in names):
        return "idx"
    if names and all(n.endswith(".parquet") for n in names):
        raise ValueError(
            f"{source} holds Parquet files but no _sparkvision.json: it is not a sparkvision image table"
        )
    return "folder"


def _binary_reader(spark: SparkSession, glob: str | None):
    reader = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("ignoreMissingFiles", "true")
        .option("ignoreCorruptFiles", "true")
    )
    if glob:
        reader = reader.option("pathGlobFilter", glob)
    return reader


def ingest(
    spark: SparkSession,
    source: str,
    table: str,
    *,
    kind: str = "auto",
    split: str | None = None,
    labeled: bool = True,
    class_names: list[str] | None = None,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    mode: str = "append",
    rejects: str | None = None,
    glob: str | None = None,
    _on_listed: Callable[[], None] | None = None,
) -> IngestSummary:
    """Ingest ``source`` into the image table ``table`` and write rejects beside it.

    ``mode="append"`` adds to an existing table, skipping content already there; ``"overwrite"``
    replaces it. ``_on_listed`` is a test hook run between listing and reading files.
    """
    if kind not in SOURCE_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode {mode!r} must be 'append' or 'overwrite'")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not storage.exists(spark, source):
        raise FileNotFoundError(f"source {source} does not exist")
    timer = Timer()
    table_q = storage.qualify(table)
    rejects_q = storage.qualify(rejects or table.rstrip("/") + "_rejects")
    if kind == "auto":
        kind = detect_source_kind(spark, source)
    summary = IngestSummary(table=table_q, rejects_table=rejects_q, source=source, source_kind=kind)

    existing: TableMeta | None = None
    if mode == "append" and is_image_table(spark, table):
        existing = read_meta(spark, table)

    with spark_progress(spark, f"ingest {kind}"):
        if kind == "folder":
            decoded, unreadable, names = _decode_folder(spark, source, split, labeled, max_pixels, glob, _on_listed)
        elif kind == "idx":
            decoded, names = _decode_idx(spark, source, split, class_names)
            unreadable = None
        else:
            decoded, names = _decode_table(spark, source)
            unreadable = None
        names = list(class_names) if class_names else names
        all_names = merge_class_names(existing.class_names if existing else [], names)
        _finish(spark, summary, decoded, unreadable, all_names, existing is not None, mode)

    sources = (existing.sources if existing else []) + [source]
    write_meta(spark, table, TableMeta(class_names=all_names, sources=sources))
    summary.class_names = all_names
    summary.elapsed_s = round(timer.elapsed, 3)
    total = summary.rows_written + sum(summary.rejects_by_reason.values())
    summary.images_per_s = round(total / max(timer.elapsed, 1e-9), 1)
    return summary


def _decode_folder(spark, source, split, labeled, max_pixels, glob, on_listed):
    """Read and decode every file in one pass; whatever the file index listed but the scan did not
    return is then looked at one by one on the driver (usually nothing): zero bytes, or unreadable.
    """
    root = qualified_root(spark, source)
    files = _binary_reader(spark, glob).load(root)
    indexed = files.inputFiles()  # the listing Spark already holds on the driver: names only
    if on_listed is not None:
        on_listed()
    # Spark plans one task per ~32 small files (each file "costs" openCostInBytes = 4 MB), which
    # for folders of thumbnails means thousands of tiny tasks; coalescing keeps reads local.
    slots = spark.sparkContext.defaultParallelism
    content = files.select("path", "content").coalesce(read_partitions(slots, len(indexed), _size_in_bytes(files)))
    content = _layout_columns(content, root, split, labeled)
    decoded = content.select("path", "content", "split", "label_name").mapInArrow(
        _decode_batches(max_pixels), DECODED_SCHEMA
    )
    decoded = decoded.persist(StorageLevel.MEMORY_AND_DISK)
    counts = decoded.groupBy("label_name").count().collect()  # decodes everything, fills the cache
    names = sorted(r.label_name for r in counts if r.label_name is not None)
    missing = _missing_files(spark, indexed, sum(r["count"] for r in counts), decoded)
    return decoded, missing, names


def _size_in_bytes(df: DataFrame) -> int:
    """Total size of the files behind ``df``, from the file index (no job runs); 0 if unknown."""
    try:
        return int(str(df._jdf.queryExecution().optimizedPlan().stats().sizeInBytes().toString()))
    except Exception:  # noqa: BLE001 - only a partitioning hint
        return 0


def _spark_path(uri: str) -> str:
    """``inputFiles()`` spells ``file:///x%20y``; the ``path`` column spells ``file:/x y``."""
    if uri.startswith("file:///"):
        uri = "file:/" + uri[len("file:///") :]
    return unquote(uri)


def read_partitions(slots: int, n_files: int, total_bytes: int) -> int:
    """Tasks for decoding a folder: at least two per slot, at most ~64 MiB or 4,096 files each."""
    return max(2 * slots, math.ceil(total_bytes / (64 << 20)), math.ceil(n_files / 4096))


def _missing_files(spark: SparkSession, indexed: list[str], n_read: int, decoded: DataFrame) -> DataFrame | None:
    """Rejects for files the index listed but the scan did not return.

    Spark's file scans silently skip zero-byte files (``empty_file``) and, with
    ``ignoreMissingFiles``/``ignoreCorruptFiles``, files that vanished or failed to read
    (``unreadable``). Usually the counts match and nothing else runs.
    """
    if len(indexed) == n_read:
        return None
    scanned = {r.path for r in decoded.select("path").collect()}
    rows = []
    for path in sorted({_spark_path(p) for p in indexed} - scanned):
        size = _file_size(spark, path)
        if size == 0:
            rows.append((path, "empty_file", "0 bytes", 0))
        else:
            rows.append((path, "unreadable", "listed but could not be read (permissions, removed, or I/O error)", size))
    if not rows:
        return None
    return spark.createDataFrame(rows, "path string, reason string, detail string, size_bytes long")


def _file_size(spark: SparkSession, path: str) -> int | None:
    try:
        fs, p = storage._fs_and_path(spark, path)
        return int(fs.getFileStatus(p).getLen())
    except Exception:  # noqa: BLE001 - gone or unreadable: no size
        return None


def _decode_idx(spark, source, split, class_names):
    root = storage.qualify(source)
    files = _binary_reader(spark, None).load(root)
    names = [r.path.rsplit("/", 1)[-1] for r in files.select("path").collect()]  # file names only
    pairs = pair_idx_files(names)
    if not pairs:
        raise ValueError(f"{source}: no IDX image files (*-images-idx3-ubyte[.gz]) found")
    if split is not None:
        pairs = [(split, i, lab) for _, i, lab in pairs]
    wanted = {n for _, i, lab in pairs for n in (i, lab) if n}
    files = files.where(F.element_at(F.split("path", "/"), -1).isin(*wanted))
    n_parts = max(2, spark.sparkContext.defaultParallelism * 2)
    raw = files.select("path", "content").coalesce(1).mapInArrow(_parse_idx_batches(pairs), IDX_RAW_SCHEMA)
    if class_names:
        names_out = list(class_names)
    elif "fashion" in source.lower():
        names_out = list(FASHION_MNIST_CLASSES)
    else:
        names_out = [str(i) for i in range(10)]
    decoded = raw.repartition(n_parts).mapInArrow(_encode_idx_batches(names_out), DECODED_SCHEMA)
    return decoded, names_out


def _decode_table(spark, source):
    meta = read_meta(spark, source)
    df = read_table(spark, source)
    decoded = df.select(
        *[c for c in IMAGE_SCHEMA.fieldNames() if c != "label"],
        F.lit(None).cast("string").alias("reason"),
        F.lit(None).cast("string").alias("detail"),
        F.length("image").cast("long").alias("size_bytes"),
    )
    return decoded, meta.class_names


def _finish(
    spark: SparkSession,
    summary: IngestSummary,
    decoded: DataFrame,
    unreadable: DataFrame | None,
    class_names: list[str],
    table_exists: bool,
    mode: str,
) -> None:
    """Deduplicate, assign label indices, write rows and rejects, and fill in the summary.

    Duplicates are found on (content_id, path) alone, so image bytes are never shuffled; only the
    (usually short) list of paths to drop is joined back.
    """
    decoded = decoded.persist(StorageLevel.MEMORY_AND_DISK)
    stats = decoded.groupBy("split", "label_name", "reason").count().collect()  # fills the cache
    good = decoded.where(F.col("reason").isNull())
    meta = good.select("content_id", "path", "size_bytes", "split", "label_name")
    w = Window.partitionBy("content_id").orderBy("path")
    ranked = meta.withColumn("_rank", F.row_number().over(w)).withColumn("_first", F.first("path").over(w))
    drops = ranked.where(F.col("_rank") > 1).select(
        "path",
        F.lit("duplicate").alias("reason"),
        F.concat(F.lit("same content as "), F.col("_first")).alias("detail"),
        "size_bytes",
        "split",
        "label_name",
    )
    if table_exists and mode == "append":
        existing_ids = spark.read.parquet(summary.table).select("content_id")
        of_table = (
            ranked.where(F.col("_rank") == 1)
            .join(existing_ids, "content_id", "left_semi")
            .select(
                "path",
                F.lit("duplicate").alias("reason"),
                F.lit("content already in the table").alias("detail"),
                "size_bytes",
                "split",
                "label_name",
            )
        )
        drops = drops.unionByName(of_table)
    drops = drops.persist(StorageLevel.MEMORY_AND_DISK)
    drop_counts = drops.groupBy("split", "label_name", "detail").count().collect()
    keep = good.join(F.broadcast(drops.select("path")), "path", "left_anti") if drop_counts else good

    label_map = F.create_map(*[x for i, n in enumerate(class_names) for x in (F.lit(n), F.lit(i))])
    label_col = label_map[F.col("label_name")] if class_names else F.lit(None)
    rows = keep.select(
        *[label_col.cast("int").alias("label") if c == "label" else F.col(c) for c in IMAGE_SCHEMA.fieldNames()]
    )

    # Rejects are written before the rows: writing the table makes Spark re-cache every plan that
    # reads it, and the "already in the table" drops would then count this ingest's own rows.
    reject_parts = [decoded.where(F.col("reason").isNotNull()).select("path", "reason", "detail", "size_bytes")]
    reject_parts.append(drops.select("path", "reason", "detail", "size_bytes"))
    if unreadable is not None:
        reject_parts.append(unreadable)
    rejects = reject_parts[0]
    for part in reject_parts[1:]:
        rejects = rejects.unionByName(part)
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    rejects = rejects.withColumn("source", F.lit(summary.source)).withColumn("ingested_at", F.lit(stamp))
    rejects = rejects.persist(StorageLevel.MEMORY_AND_DISK)
    reject_counts = {r.reason: r["count"] for r in rejects.groupBy("reason").count().collect()}
    if reject_counts or not storage.exists(spark, summary.rejects_table):
        rejects.coalesce(1).write.mode("append").parquet(summary.rejects_table)
    rows.write.mode(mode).parquet(summary.table)
    rejects.unpersist()
    drops.unpersist()
    decoded.unpersist()

    by_split: dict[str, int] = {}
    by_class: dict[str, int] = {}

    def add(split: str, name: str | None, n: int) -> None:
        by_split[split] = by_split.get(split, 0) + n
        key = name if name is not None else "(unlabeled)"
        by_class[key] = by_class.get(key, 0) + n

    for r in stats:
        if r.reason is None:
            add(r.split, r.label_name, r["count"])
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
