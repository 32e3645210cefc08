"""What :func:`sparkvision.data.ingest.ingest` reads: image folders, IDX files and image tables,
each turned into rows of :data:`~sparkvision.data.decode.DECODED_SCHEMA`.

Files are listed and read with Spark's own ``binaryFile`` source, so any URI Spark reads works;
the driver only ever holds file names and counts. A local folder is walked first
(:mod:`sparkvision.data.listing`): directory symlinks are never followed, and what Spark would skip
without a word (names that are not UTF-8, broken links) becomes a reject.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from pyspark import StorageLevel
from pyspark.sql import DataFrame, DataFrameReader, SparkSession
from pyspark.sql import functions as F

from sparkvision.data.decode import (
    DECODED_SCHEMA,
    IDX_RAW_SCHEMA,
    decode_batches,
    encode_idx_batches,
    parse_idx_batches,
)
from sparkvision.data.globs import glob_matcher
from sparkvision.data.idx import FASHION_MNIST_CLASSES, looks_like_idx, pair_idx_files
from sparkvision.data.listing import RejectRow, escape_glob, list_local_folder
from sparkvision.data.schema import SPLITS, TABLE_SCHEMA
from sparkvision.data.table import is_image_table, read_meta, read_table
from sparkvision.spark import storage
from sparkvision.spark.compat import default_parallelism
from sparkvision.spark.session import is_connect
from sparkvision.spark.taskclock import clock_path

# --------------------------------------------------------------------------- listing


def binary_reader(spark: SparkSession, glob: str | None) -> DataFrameReader:
    """Spark's ``binaryFile`` reader, recursive, skipping files that vanish or cannot be read
    (:func:`missing_files` turns those into rejects instead of a failed job)."""
    reader = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("ignoreMissingFiles", "true")
        .option("ignoreCorruptFiles", "true")
    )
    if glob:
        reader = reader.option("pathGlobFilter", glob)
    return reader


def detect_source_kind(spark: SparkSession, source: str) -> Literal["table", "idx", "folder"]:
    """``table``, ``idx`` or ``folder``: what ``kind="auto"`` reads ``source`` as."""
    if is_image_table(spark, source):
        return "table"
    if looks_like_idx(source):
        return "idx"
    # A sample of file names from Spark's file index: no job runs, no file is opened.
    names = binary_reader(spark, None).load(list_source(spark, source, None)[1]).inputFiles()[:1000]
    if names and all(looks_like_idx(n) for n in names):
        return "idx"
    if names and all(n.endswith(".parquet") for n in names):
        raise ValueError(
            f"{source} holds Parquet files but no _sparkvision.json: it is not a sparkvision image table"
        )
    return "folder"


def qualified_root(spark: SparkSession, uri: str) -> str:
    """The root as Spark spells the paths it lists (``file:/x``, not ``file:///x``).

    A Spark Connect client cannot ask Hadoop to qualify a path: a local path is spelled as Hadoop
    would, any other URI is taken as given (give ``hdfs://`` paths with their name node then).
    """
    if is_connect(spark):
        q = storage.qualify(uri)
        if q.startswith("file:"):
            q = "file:/" + q[len("file:") :].lstrip("/")
        return q.rstrip("/")
    jvm = spark.sparkContext._jvm
    assert jvm is not None  # set while the SparkContext is running
    p = jvm.org.apache.hadoop.fs.Path(storage.qualify(uri))
    fs = p.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return str(fs.makeQualified(p).toString()).rstrip("/")


def list_source(spark: SparkSession, source: str, glob: str | None) -> tuple[str, list[str], list[RejectRow]]:
    """``(root as Spark spells it, paths to hand Spark's reader, rejects found while listing)``.

    A local directory is walked by :func:`sparkvision.data.listing.list_local_folder` so Spark
    never follows a directory symlink; any other source (a file, HDFS, an object store: no
    symlinks there) is handed to Spark as it is.
    """
    root = qualified_root(spark, source)
    local = root[len("file:") :] if root.startswith("file:/") else None
    if local is None or not os.path.isdir(local):
        return root, [root], []
    listing = list_local_folder(local, glob_filter(spark, glob))
    if listing.paths == [os.path.normpath(local)]:
        return root, [root], listing.rejects
    return root, ["file:" + escape_glob(p) for p in listing.paths], listing.rejects


def glob_filter(spark: SparkSession, glob: str | None) -> Callable[[str], bool]:
    """Whether a file name passes ``pathGlobFilter``: Hadoop's own pattern (what its ``GlobFilter``
    matches each name against), so braces and escapes mean what they mean to Spark."""
    if not glob:
        return lambda name: True
    if is_connect(spark):
        return glob_matcher(glob)
    jvm = spark.sparkContext._jvm
    assert jvm is not None  # set while the SparkContext is running
    pattern = jvm.org.apache.hadoop.fs.GlobPattern(glob)
    return lambda name: bool(pattern.matches(name))


def read_partitions(slots: int, n_files: int, total_bytes: int) -> int:
    """Tasks for decoding a folder: at least two per slot, at most ~64 MiB or 4,096 files each."""
    return max(2 * slots, math.ceil(total_bytes / (64 << 20)), math.ceil(n_files / 4096))


# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class DecodedStats:
    """What ingest needs to know of its decoded rows before writing them: the rows per
    ``(split, label_name, reason)`` and whether two good rows share a content id."""

    counts: list[tuple[str, str | None, str | None, int]]
    duplicates: bool

    @property
    def rows(self) -> int:
        return sum(c[3] for c in self.counts)

    @property
    def label_names(self) -> list[str]:
        return sorted({c[1] for c in self.counts if c[1] is not None})


def decoded_stats(decoded: DataFrame) -> DecodedStats:
    """:class:`DecodedStats` in one aggregation job (which also fills ``decoded``'s cache).

    Two grouping sets: the counts per ``(split, label_name, reason)``, and the whole table, whose
    distinct content ids among good rows, fewer than the good rows, say a duplicate exists. Only
    then does ingest rank rows by content id (a shuffle and a sort); usually it need not.
    """
    keys = ["split", "label_name", "reason"]
    good_id = F.when(F.col("reason").isNull(), F.col("content_id"))
    rows = (
        decoded.groupingSets([keys, []], *keys)
        .agg(F.count("*").alias("n"), F.count_distinct(good_id).alias("ids"), F.grouping_id().alias("gid"))
        .collect()  # one row per split, class and reason: counts, not data
    )
    detail = [r for r in rows if r.gid == 0]
    ids = sum(r.ids for r in rows if r.gid != 0)
    good = sum(r.n for r in detail if r.reason is None)
    return DecodedStats([(r.split, r.label_name, r.reason, int(r.n)) for r in detail], ids < good)


# --------------------------------------------------------------------------- folders


def layout_columns(df: DataFrame, root: str, split: str | None, labeled: bool) -> DataFrame:
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


def decode_folder(
    spark: SparkSession,
    source: str,
    split: str | None,
    labeled: bool,
    max_pixels: int,
    glob: str | None,
    on_listed: Callable[[], None] | None = None,
    max_side: int | None = None,
) -> tuple[DataFrame, DataFrame | None, list[str], DecodedStats]:
    """``(decoded rows, rejects for files not read or None, class names, their counts)``.

    Every file is read and decoded in one pass, the job that counts them (:func:`decoded_stats`);
    whatever the file index listed but the scan did not return is then looked at one by one on
    the driver (usually nothing): zero bytes, or unreadable. Those join the rejects of the walk
    (:func:`list_source`). ``on_listed`` runs between listing and reading (a test removes files
    there). ``max_side``: larger images are stored downscaled
    (:func:`~sparkvision.data.decode.decode_batches`).
    """
    root, paths, rejects = list_source(spark, source, glob)
    files = binary_reader(spark, glob).load(paths)
    indexed = files.inputFiles()  # the listing Spark already holds on the driver: names only
    if on_listed is not None:
        on_listed()
    # Spark plans one task per ~32 small files (each file "costs" openCostInBytes = 4 MB), which
    # for folders of thumbnails means thousands of tiny tasks; coalescing keeps reads local.
    slots = default_parallelism(spark)
    content = files.select("path", "content").coalesce(
        read_partitions(slots, len(indexed), _size_in_bytes(spark, files))
    )
    content = layout_columns(content, root, split, labeled)
    decoded = content.select("path", "content", "split", "label_name").mapInArrow(
        decode_batches(max_pixels, clock_path(), max_side), DECODED_SCHEMA
    )
    decoded = decoded.persist(StorageLevel.MEMORY_AND_DISK)
    stats = decoded_stats(decoded)  # decodes everything, fills the cache
    rejects += missing_files(spark, indexed, stats.rows, decoded)
    if not rejects:
        return decoded, None, stats.label_names, stats
    return (
        decoded,
        spark.createDataFrame(rejects, "path string, reason string, detail string, size_bytes long"),
        stats.label_names,
        stats,
    )


_UNITS = {"B": 0, "KiB": 10, "MiB": 20, "GiB": 30, "TiB": 40, "PiB": 50, "EiB": 60}


def _size_in_bytes(spark: SparkSession, df: DataFrame) -> int:
    """Total size of the files behind ``df``, from the file index (no job runs); 0 if unknown.

    A Spark Connect client has no query execution to ask: it reads the same statistic from the
    cost plan's text (``sizeInBytes=1.5 MiB``), rounded but good enough for a partitioning hint.
    """
    try:
        if not is_connect(spark):
            return int(str(df._jdf.queryExecution().optimizedPlan().stats().sizeInBytes()))  # int or BigInt
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            df.explain(mode="cost")
        m = re.search(r"sizeInBytes=([\d.]+)\s*([KMGTPE]?i?B)\b", buf.getvalue())
        return int(float(m.group(1)) * (1 << _UNITS[m.group(2)])) if m else 0
    except Exception:  # noqa: BLE001 - only a partitioning hint
        return 0


def _spark_path(uri: str) -> str:
    """``inputFiles()`` spells ``file:///x%20y``; the ``path`` column spells ``file:/x y``."""
    if uri.startswith("file:///"):
        uri = "file:/" + uri[len("file:///") :]
    return unquote(uri)


def missing_files(
    spark: SparkSession, indexed: list[str], n_read: int, decoded: DataFrame
) -> list[RejectRow]:
    """Rejects for files the index listed but the scan did not return.

    Spark's file scans silently skip zero-byte files (``empty_file``) and, with
    ``ignoreMissingFiles``/``ignoreCorruptFiles``, files that vanished or failed to read
    (``unreadable``). Usually the counts match and nothing else runs.
    """
    if len(indexed) == n_read:
        return []
    scanned = {r.path for r in decoded.select("path").collect()}
    rows: list[RejectRow] = []
    for path in sorted({_spark_path(p) for p in indexed} - scanned):
        size = _file_size(spark, path)
        if size == 0:
            rows.append((path, "empty_file", "0 bytes", 0))
        else:
            rows.append(
                (
                    path,
                    "unreadable",
                    "listed but could not be read (permissions, removed, or I/O error)",
                    size,
                )
            )
    return rows


def _file_size(spark: SparkSession, path: str) -> int | None:
    try:
        return storage.file_size(spark, path)
    except Exception:  # noqa: BLE001 - gone or unreadable: no size
        return None


# --------------------------------------------------------------------------- IDX files and tables


def decode_idx(
    spark: SparkSession, source: str, split: str | None, class_names: list[str] | None
) -> tuple[DataFrame, list[str]]:
    """``(decoded rows, class names)`` of the IDX image/label file pairs under ``source``.

    Without ``class_names``, a source whose name says Fashion-MNIST gets its ten names, any other
    the digits 0-9 (MNIST).
    """
    files = binary_reader(spark, None).load(list_source(spark, source, None)[1])
    names = [r.path.rsplit("/", 1)[-1] for r in files.select("path").collect()]  # file names only
    pairs = pair_idx_files(names)
    if not pairs:
        raise ValueError(f"{source}: no IDX image files (*-images-idx3-ubyte[.gz]) found")
    if split is not None:
        pairs = [(split, i, lab) for _, i, lab in pairs]
    wanted = {n for _, i, lab in pairs for n in (i, lab) if n}
    files = files.where(F.element_at(F.split("path", "/"), -1).isin(*wanted))
    n_parts = max(2, default_parallelism(spark) * 2)
    raw = files.select("path", "content").coalesce(1).mapInArrow(parse_idx_batches(pairs), IDX_RAW_SCHEMA)
    if class_names:
        names_out = list(class_names)
    elif "fashion" in source.lower():
        names_out = list(FASHION_MNIST_CLASSES)
    else:
        names_out = [str(i) for i in range(10)]
    decoded = raw.repartition(n_parts).mapInArrow(encode_idx_batches(names_out), DECODED_SCHEMA)
    return decoded, names_out


def decode_table(spark: SparkSession, source: str) -> tuple[DataFrame, list[str]]:
    """``(rows, class names)`` of an existing image table, as decoded rows (nothing is re-decoded)."""
    meta = read_meta(spark, source)
    df = read_table(spark, source)
    decoded = df.select(
        *[c for c in TABLE_SCHEMA.fieldNames() if c != "label"],
        F.lit(None).cast("string").alias("reason"),
        F.lit(None).cast("string").alias("detail"),
        F.length("image").cast("long").alias("size_bytes"),
    )
    return decoded, meta.class_names
