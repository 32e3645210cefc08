"""Reading image tables and their metadata (class names), written by :mod:`sparkvision.data.ingest`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from sparkvision.data.images import PixelDtype, pixel_dtype
from sparkvision.data.schema import META_FILE, SCHEMA_VERSION, TABLE_SCHEMA
from sparkvision.spark import storage


@dataclass
class TableMeta:
    class_names: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    sources: list[str] = field(default_factory=list)
    # "float32": rows are feature vectors (mode-F TIFFs, e.g. ``ingest-raster``) that decode as
    # floats; "uint8" (absent from the file): images, decoded to 8 bits (``images.to_8bit``).
    pixel_dtype: PixelDtype = "uint8"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "class_names": self.class_names,
            "schema_version": self.schema_version,
            "sources": self.sources,
        }
        if self.pixel_dtype != "uint8":
            d["pixel_dtype"] = self.pixel_dtype
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TableMeta:
        return cls(
            class_names=list(d.get("class_names", [])),
            schema_version=int(d.get("schema_version", SCHEMA_VERSION)),
            sources=list(d.get("sources", [])),
            pixel_dtype=pixel_dtype(d.get("pixel_dtype", "uint8")),
        )


def meta_uri(table: str) -> str:
    return storage.join(storage.qualify(table), META_FILE)


def is_image_table(spark: SparkSession, table: str) -> bool:
    return storage.exists(spark, meta_uri(table))


def read_meta(spark: SparkSession, table: str) -> TableMeta:
    uri = meta_uri(table)
    if not storage.exists(spark, uri):
        raise FileNotFoundError(
            f"{table} is not a sparkvision image table (no {META_FILE}); create one with `sparkvision ingest`"
        )
    return TableMeta.from_json(storage.read_json(spark, uri))


def write_meta(spark: SparkSession, table: str, meta: TableMeta) -> None:
    storage.write_json(spark, meta_uri(table), meta.to_json())


def read_table(spark: SparkSession, table: str, split: str | None = None) -> DataFrame:
    """The image table as a DataFrame, optionally one split only (train / test / val / unlabeled).

    Read with :data:`~sparkvision.data.schema.TABLE_SCHEMA`: an optional column a table lacks
    (written before it existed) reads as nulls."""
    read_meta(spark, table)  # a clear error for a path that is not an image table
    df = spark.read.schema(TABLE_SCHEMA).parquet(storage.qualify(table))
    if split is not None:
        df = df.where(df.split == split)
    return df


def merge_class_names(existing: list[str], new: list[str]) -> list[str]:
    """Existing classes keep their indices; new ones are appended in the order given."""
    out = list(existing)
    for name in new:
        if name not in out:
            out.append(name)
    return out
