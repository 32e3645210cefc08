"""The image table: one Parquet table per data set, with its class names beside it.

Schema (one row per image)::

    content_id  string   sha256 of the encoded bytes, hex; stable across re-ingests and copies
    path        string   where the image came from (a URI, or ``file#index`` for IDX records)
    image       binary   the encoded bytes exactly as they came (PNG, JPEG, ...)
    format      string   PIL's name for the encoding (PNG, JPEG, WEBP, ...)
    height      int
    width       int
    channels    int      1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) once decoded to 8 bits: palette -> RGB,
                         bilevel, 16-bit and float gray -> L, CMYK -> RGB (``images.to_8bit``)
    label       int      index into the class names; null when unlabelled
    label_name  string   the class name; null when unlabelled
    split       string   train | test | val | unlabeled

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
