"""A multiband raster and its label raster into a float image table, read on the executors.

The driver reads the two TIFF headers (size, bands, sample type: no pixel) and makes a DataFrame
of row windows (``spark.range``); ``mapInArrow`` hands each task its windows, which it reads
from the files itself (:func:`sparkvision.data.raster.read_rows`: only the strips or tiles that
hold them) and turns into rows (:func:`sparkvision.data.raster_rows.window_rows`). Only the
counts per split, class and skip reason come back to the driver; the rows go straight to Parquet.

The table is an ordinary image table (``sparkvision/data/schema.py``) whose rows are float32
feature vectors, marked ``pixel_dtype: float32`` in its ``_sparkvision.json`` so that training
and inference decode them as floats; ``_raster.json`` beside it records the features, layout and
settings. See docs/raster.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkvision.data.raster import (
    RasterError,
    RasterInfo,
    band_names,
    open_tiff,
    raster_info,
    read_rows,
    reflectance_scaling,
)
from sparkvision.data.raster_rows import (
    SKIP_REASONS,
    FeatureSet,
    FeatureSpec,
    unreadable_window,
    window_rows,
)
from sparkvision.data.schema import IMAGE_SCHEMA
from sparkvision.data.table import TableMeta, write_meta
from sparkvision.errors import ParamError
from sparkvision.spark import storage
from sparkvision.spark.progress import Timer, spark_progress
from sparkvision.transforms.spectral import SEED_004_INDICES

RASTER_META_FILE = "_raster.json"
# raster_rows.WINDOW_SCHEMA, as Spark reads it back from mapInArrow.
WINDOW_DDL = (
    "content_id string, path string, image binary, format string, height int, width int, channels int, "
    "label int, split string, skip string, n bigint, detail string"
)
# Pixels per window (a task's unit of reading): ~40 MB of encoded pixel rows, divided by K*K for
# K x K patches (each row holds K*K pixels' features).
WINDOW_PIXELS = 2**18


@dataclass
class RasterIngestSummary:
    table: str
    raster: str
    labels: str
    rows_written: int = 0
    rows_by_split: dict[str, int] = field(default_factory=dict)
    rows_by_class: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # pixels by reason (raster_rows.SKIP_REASONS)
    class_names: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)  # a pixel's features, in stored order
    image_height: int = 1
    image_width: int = 1
    patch: int = 1
    bands: list[str] = field(default_factory=list)
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    raster_size: list[int] = field(default_factory=list)  # [height, width]
    windows: int = 0
    elapsed_s: float = 0.0
    pixels_per_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def window_plan(height: int, width: int, patch: int, rows: int | None = None) -> tuple[int, int]:
    """``(rows per window, windows)``: about :data:`WINDOW_PIXELS` / patch^2 pixels a window."""
    per = rows or max(1, WINDOW_PIXELS // (patch * patch) // max(1, width))
    per = min(per, height)
    return per, math.ceil(height / per)


def read_windows(
    spec: FeatureSpec, raster: str, labels: str, info: RasterInfo, rows_per_window: int
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The ``mapInArrow`` body: window numbers in, their rows out (the files opened once a task).
    A window that cannot be read becomes one ``unreadable`` row, which the driver reports."""
    half = spec.patch // 2

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        with ExitStack() as files:
            opened: list[Any] = []
            for batch in batches:
                for w in batch.column("id").to_pylist():
                    r0 = w * rows_per_window
                    r1 = min(info.height, r0 + rows_per_window)
                    b0 = max(0, r0 - half)
                    try:
                        if not opened:
                            opened += [
                                files.enter_context(open_tiff(raster)),
                                files.enter_context(open_tiff(labels)),
                            ]
                        raw = read_rows(opened[0], b0, min(info.height, r1 + half))
                        lab = read_rows(opened[1], r0, r1)[0]
                    except Exception as e:  # noqa: BLE001 - any decoder failure: reported on the driver
                        yield unreadable_window(r0, r1, info.width, f"{type(e).__name__}: {e}")
                        continue
                    yield window_rows(spec, raster, r0, r1, raw, b0, lab)

    return run


def header(uri: str, param: str) -> RasterInfo:
    """The header of ``uri``; an unreadable or non-TIFF file is a :class:`ParamError` on ``param``."""
    try:
        return raster_info(uri)
    except RasterError as e:
        raise ParamError(param, str(e)) from None


def check_rasters(info: RasterInfo, linfo: RasterInfo) -> None:
    if (linfo.height, linfo.width) != (info.height, info.width):
        raise ParamError(
            "labels",
            f"the label raster is {linfo.height}x{linfo.width} pixels, the raster {info.height}x{info.width}: "
            "they must share one pixel grid",
        )
    if linfo.bands != 1 or not linfo.is_integer:
        raise ParamError(
            "labels",
            f"the label raster must be one band of integer class ids; it has {linfo.bands} {linfo.dtype}",
        )


def resolve_classes(max_id: int, class_names: Sequence[str] | None) -> list[str]:
    """The table's class names: those given (for ids 1..N), else ``class_1..class_<max id>``."""
    if max_id < 1:
        raise ParamError(
            "labels", "the label raster has no labelled pixel with data (every id is 0 or nodata)"
        )
    if class_names:
        if max_id > len(class_names):
            raise ParamError(
                "class_names",
                f"the label raster has class ids up to {max_id}; class_names names {len(class_names)} "
                f"(ids 1..{len(class_names)})",
            )
        return list(class_names)
    return [f"class_{i}" for i in range(1, max_id + 1)]


def ingest_raster(
    spark: SparkSession,
    raster: str,
    labels: str,
    table: str,
    *,
    bands: Sequence[str] | None = None,
    features: FeatureSet = "indices",
    indices: Sequence[str] = SEED_004_INDICES,
    patch: int = 1,
    class_names: Sequence[str] | None = None,
    nodata: float | None = None,
    scale: float | None = None,
    offset: float | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    split_block: int = 1,
    seed: int = 0,
    window_rows: int | None = None,
) -> RasterIngestSummary:
    """Write ``table`` (replacing it) from ``raster`` and its label raster ``labels``.

    ``nodata`` is the bands' fill value (default: the raster's GDAL_NODATA tag); ``scale`` and
    ``offset`` turn stored values into reflectance (default: Landsat Collection 2's for integer
    bands). Raises :class:`ParamError` for rasters, names or settings that do not fit, before
    anything is written.
    """
    timer = Timer()
    raster_q, labels_q, table_q = storage.qualify(raster), storage.qualify(labels), storage.qualify(table)
    info, linfo = header(raster_q, "raster"), header(labels_q, "labels")
    check_rasters(info, linfo)
    try:
        names = band_names(info.bands, bands)
    except RasterError as e:
        raise ParamError("bands", str(e)) from None
    scale, offset = reflectance_scaling(info, scale, offset)
    spec = FeatureSpec(
        bands=tuple(names),
        features=features,
        indices=tuple(i.lower() for i in indices),
        scale=scale,
        offset=offset,
        nodata=info.nodata if nodata is None else nodata,
        label_nodata=linfo.nodata,
        patch=patch,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        split_block=split_block,
        seed=seed,
    )
    spec.check()
    per, n_windows = window_plan(info.height, info.width, patch, window_rows)
    with spark_progress(spark, "ingest raster"):
        rows = spark.range(0, n_windows, 1, numPartitions=n_windows).mapInArrow(
            read_windows(spec, raster_q, labels_q, info, per), WINDOW_DDL
        )
        rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            stats = rows.groupBy("skip", "split", "label").agg(F.sum("n").alias("n")).collect()
            unreadable = [r for r in stats if r.skip == "unreadable"]
            if unreadable:
                why = rows.where(F.col("skip") == "unreadable").select("detail").limit(1).collect()
                raise ParamError("raster", f"{raster} could not be read: {why[0].detail if why else '?'}")
            kept = [r for r in stats if r.skip is None]
            classes = resolve_classes(max((r.label + 1 for r in kept), default=0), class_names)
            names_col = F.element_at(F.array(*[F.lit(c) for c in classes]), F.col("label") + 1)
            table_cols = [
                names_col.alias(c) if c == "label_name" else F.col(c) for c in IMAGE_SCHEMA.fieldNames()
            ]
            rows.where(F.col("skip").isNull()).select(*table_cols).write.mode("overwrite").parquet(table_q)
        finally:
            rows.unpersist()
    summary = RasterIngestSummary(
        table=table_q,
        raster=raster_q,
        labels=labels_q,
        class_names=classes,
        features=spec.names,
        image_height=spec.image_shape[0],
        image_width=spec.image_shape[1],
        patch=patch,
        bands=names,
        scale=scale,
        offset=offset,
        nodata=spec.nodata,
        raster_size=[info.height, info.width],
        windows=n_windows,
    )
    for r in kept:
        summary.rows_by_split[r.split] = summary.rows_by_split.get(r.split, 0) + r.n
        name = classes[r.label]
        summary.rows_by_class[name] = summary.rows_by_class.get(name, 0) + r.n
    summary.rows_by_split = dict(sorted(summary.rows_by_split.items()))
    summary.rows_by_class = {c: summary.rows_by_class[c] for c in classes if c in summary.rows_by_class}
    summary.rows_written = sum(summary.rows_by_split.values())
    summary.skipped = {k: sum(r.n for r in stats if r.skip == k) for k in SKIP_REASONS[:3]}
    write_meta(
        spark, table, TableMeta(class_names=classes, sources=[raster_q, labels_q], pixel_dtype="float32")
    )
    summary.elapsed_s = round(timer.elapsed, 3)
    summary.pixels_per_s = round(info.height * info.width / max(timer.elapsed, 1e-9), 1)
    storage.write_json(
        spark,
        storage.join(table_q, RASTER_META_FILE),
        {
            **summary.to_json(),
            "layout": "image[i, j * F + f] = feature f of patch pixel (i, j)",
            **_split_meta(spec),
        },
    )
    return summary


def _split_meta(spec: FeatureSpec) -> dict[str, Any]:
    return {
        "test_fraction": spec.test_fraction,
        "val_fraction": spec.val_fraction,
        "split_block": spec.split_block,
        "seed": spec.seed,
        "indices": list(spec.indices),
        "feature_set": spec.features,
    }
