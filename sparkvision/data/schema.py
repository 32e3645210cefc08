"""The image table: one Parquet table per data set, with its class names beside it.

Schema (one row per image)::

    content_id  string   sha256 of the source file's bytes, hex; stable across re-ingests and copies,
                         also when ``ingest --max-side`` stored a smaller copy (the id is the file's)
    path        string   where the image came from (a URI, or ``file#index`` for IDX records)
    image       binary   the encoded bytes exactly as they came (PNG, JPEG, ...), or the downscaled
                         copy ``ingest --max-side`` made (PNG, or JPEG for JPEG sources)
    format      string   PIL's name for the stored encoding (PNG, JPEG, WEBP, ...)
    height      int      the stored image's size, upright (EXIF orientation applied)
    width       int
    channels    int      1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) once decoded to 8 bits: palette -> RGB,
                         bilevel, 16-bit and float gray -> L, CMYK -> RGB (``images.to_8bit``)
    label       int      index into the class names; null when unlabelled
    label_name  string   the class name; null when unlabelled
    split       string   train | test | val | unlabeled
    original_mode string PIL's mode of the source before any conversion (RGB, L, P, RGBA, CMYK,
                         I;16, ...); null in tables written before it existed and by operations
                         that make images (scenes, ingest-raster, crops). Optional: see
                         :data:`OPTIONAL_FIELDS`.

The class names and table-level facts live in ``_sparkvision.json`` inside the table directory.
Spark skips files whose names start with ``_``, so the table stays a plain Parquet table that any
Spark job, DuckDB or pandas can read.
"""

from __future__ import annotations

from typing import Literal, get_args

from pyspark.sql.types import (
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

Split = Literal["train", "test", "val", "unlabeled"]
SPLITS: tuple[str, ...] = get_args(Split)
META_FILE = "_sparkvision.json"
SCHEMA_VERSION = 1

IMAGE_SCHEMA = StructType(
    [
        StructField("content_id", StringType(), False),
        StructField("path", StringType(), False),
        StructField("image", BinaryType(), False),
        StructField("format", StringType(), True),
        StructField("height", IntegerType(), False),
        StructField("width", IntegerType(), False),
        StructField("channels", IntegerType(), False),
        StructField("label", IntegerType(), True),
        StructField("label_name", StringType(), True),
        StructField("split", StringType(), False),
    ]
)

# Columns added after the first schema: ingest writes them, but tables written before them (and
# tables other operations write) lack them. Readers go through :data:`TABLE_SCHEMA`, with which
# Spark reads a missing column as nulls, so a table of any age reads with one schema; code that
# builds rows from :data:`IMAGE_SCHEMA` alone keeps working.
OPTIONAL_FIELDS: tuple[StructField, ...] = (StructField("original_mode", StringType(), True),)

# Every column of an image table as ingest writes it and :func:`~sparkvision.data.table.read_table`
# reads it.
TABLE_SCHEMA = StructType([*IMAGE_SCHEMA.fields, *OPTIONAL_FIELDS])

REJECT_SCHEMA = StructType(
    [
        StructField("path", StringType(), False),
        StructField("reason", StringType(), False),
        StructField("detail", StringType(), True),
        StructField("size_bytes", LongType(), True),
    ]
)

# Why a file was rejected. Stable strings: scripts filter on them.
REJECT_REASONS = (
    "empty_file",  # zero bytes
    "not_an_image",  # no decoder recognises the bytes
    "truncated",  # header parsed but pixel data ends early or is corrupt
    "unsupported_mode",  # pixels with no 8-bit reading, e.g. LAB (16-bit, float, CMYK are read)
    "too_many_pixels",  # over the decompression-bomb limit
    "unreadable",  # could not be read: permissions, vanished, I/O error, broken symlink, unlistable dir
    "duplicate",  # same content_id as another image in this ingest or already in the table
    "bad_name",  # its path is not valid UTF-8 (Spark cannot name it)
    "symlinked_dir",  # a directory symlink, never followed (no loops, nothing outside the source)
    "coco_size_mismatch",  # its size in the COCO file (ingest --coco) differs: the boxes would be wrong
)
