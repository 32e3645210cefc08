"""Executor-side ``mapInArrow`` bodies of :mod:`sparkvision.data.ingest`: bytes in, image rows out.

Each function returns the closure Spark ships to the executors; they see one Arrow batch at a
time, so a folder of any size is decoded without any image reaching the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql.types import (
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from sparkvision.data.idx import parse_idx
from sparkvision.data.images import RejectError, content_id, encode_png, load_image, shrink
from sparkvision.data.schema import TABLE_SCHEMA
from sparkvision.spark.taskclock import NullClock, task_clock

ArrowBatches = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]

# Decoded rows before label indices are assigned: the image columns plus why a row was rejected.
# Every column is nullable: a rejected row has no content id, bytes or geometry, and Spark trusts
# a declared non-null column (a null there fails the task with a NullPointerException).
DECODED_SCHEMA = StructType(
    [StructField(f.name, f.dataType, True) for f in TABLE_SCHEMA.fields if f.name != "label"]
    + [
        StructField("reason", StringType(), True),
        StructField("detail", StringType(), True),
        StructField("size_bytes", LongType(), True),
    ]
)

# One IDX record as raw pixels, between parsing the files (one task) and encoding PNGs (many).
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


# The PIL mode of an IDX record's pixels (uint8, 1-4 channels), as ``Image.fromarray`` reads them.
IDX_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def arrow_schema(schema: StructType) -> pa.Schema:
    """The Arrow schema ``mapInArrow`` must yield for a Spark schema of these column types."""
    mapping = {
        StringType: pa.string(),
        BinaryType: pa.binary(),
        IntegerType: pa.int32(),
        LongType: pa.int64(),
    }
    return pa.schema([pa.field(f.name, mapping[type(f.dataType)], nullable=True) for f in schema.fields])


def decode_batches(max_pixels: int, clock: str | None = None, max_side: int | None = None) -> ArrowBatches:
    """mapInArrow body: (path, content, split, label_name) -> DECODED_SCHEMA rows.

    ``clock``: the file a profile's tasks append their stage times to (:mod:`~sparkvision.spark.taskclock`).
    ``max_side``: images with a longer side are stored downscaled (:func:`~sparkvision.data.images.shrink`);
    the content id stays the source file's, so the same file is one id at any ``max_side``.
    """
    out_schema = arrow_schema(DECODED_SCHEMA)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        t = task_clock(clock, "ingest_decode")
        try:
            yield from decode_rows(batches, t)
        finally:
            t.close()

    def decode_rows(batches: Iterator[pa.RecordBatch], t: NullClock) -> Iterator[pa.RecordBatch]:
        for batch in t.inputs(batches):
            cols = batch.to_pydict()
            out: dict[str, list] = {f.name: [] for f in DECODED_SCHEMA.fields}
            for path, data, split, label_name in zip(
                cols["path"], cols["content"], cols["split"], cols["label_name"], strict=True
            ):
                data = data or b""
                row: tuple[
                    str | None,
                    bytes | None,
                    str | None,
                    int | None,
                    int | None,
                    int | None,
                    str | None,
                    str | None,
                    str | None,
                ]
                try:
                    img, info = load_image(data, max_pixels, max_side)
                    stored = data
                    small = shrink(img, info, max_side) if max_side is not None else None
                    if small is not None:
                        stored, info = small
                    row = (
                        content_id(data),
                        stored,
                        info.format,
                        info.height,
                        info.width,
                        info.channels,
                        info.mode,
                        None,
                        None,
                    )
                except RejectError as e:
                    row = (None, None, None, None, None, None, None, e.reason, e.detail)
                cid, img_bytes, fmt, h, w, c, original_mode, reason, detail = row
                out["content_id"].append(cid)
                out["path"].append(path)
                out["image"].append(img_bytes)
                out["format"].append(fmt)
                out["height"].append(h)
                out["width"].append(w)
                out["channels"].append(c)
                out["original_mode"].append(original_mode)
                out["label_name"].append(label_name if split != "unlabeled" else None)
                out["split"].append(split)
                out["reason"].append(reason)
                out["detail"].append(detail)
                out["size_bytes"].append(len(data))
            t.lap("decode")
            result = pa.RecordBatch.from_pydict(out, schema=out_schema)
            t.lap("columns")
            t.rows(batch.num_rows)
            yield result
            t.lap("output")

    return run


def parse_idx_batches(pairs: list[tuple[str, str, str | None]], chunk: int = 4096) -> ArrowBatches:
    """mapInArrow body: the raw IDX files (one task sees all of them) -> one row per record."""
    out_schema = arrow_schema(IDX_RAW_SCHEMA)

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
                raise ValueError(
                    f"{images_name}: expected uint8 images of shape (N,H,W[,C]), got {images.shape}"
                )
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
                    schema=out_schema,
                )

    return run


def encode_idx_batches(class_names: list[str]) -> ArrowBatches:
    """mapInArrow body: IDX_RAW_SCHEMA rows -> DECODED_SCHEMA rows, each record as a PNG.

    A label outside ``class_names`` keeps its number as its name rather than being dropped.
    """
    out_schema = arrow_schema(DECODED_SCHEMA)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            d = batch.to_pydict()
            out: dict[str, list] = {f.name: [] for f in DECODED_SCHEMA.fields}
            for path, split, label, pixels, h, w, c in zip(
                d["path"],
                d["split"],
                d["label"],
                d["pixels"],
                d["height"],
                d["width"],
                d["channels"],
                strict=True,
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
                out["original_mode"].append(IDX_MODES.get(c))
                name: str | None
                if label is not None and not 0 <= label < len(class_names):
                    name = str(label)
                else:
                    name = None if label is None else class_names[label]
                out["label_name"].append(name)
                out["split"].append(split)
                out["reason"].append(None)
                out["detail"].append(None)
                out["size_bytes"].append(len(png))
            yield pa.RecordBatch.from_pydict(out, schema=out_schema)

    return run
