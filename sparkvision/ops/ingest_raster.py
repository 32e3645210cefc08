"""``ingest-raster``: a multiband GeoTIFF and its label raster into a float image table."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from pyspark.sql import SparkSession

from sparkvision.data.raster_rows import FeatureSet
from sparkvision.fields import CommaList
from sparkvision.ops.base import Cli, Operation, ParamError, Params, Progress, register
from sparkvision.transforms.spectral import INDICES, SEED_004_INDICES


class IngestRasterParams(Params):
    """A multiband GeoTIFF (e.g. Landsat-8 surface reflectance) and a label raster of class ids on the same pixel grid into an image table of per-pixel (or per-patch) float32 feature vectors: spectral indices and/or reflectance bands. Read on the executors, window by window. Pixels with label 0, a nodata band value or an incomplete patch are skipped and counted (docs/raster.md)."""  # noqa: E501 - one paragraph in docs/commands.md

    raster: Annotated[str, Cli(positional=True)] = Field(description="Multiband GeoTIFF (a path or URI).")
    labels: Annotated[str, Cli(positional=True)] = Field(
        description="Label raster: one band of integer class ids, 1..N; 0 is unlabelled."
    )
    table: Annotated[str, Cli(positional=True)] = Field(description="Output image table.")
    bands: CommaList = Field(
        None,
        description=(
            "Names of the raster's bands in file order, e.g. red,green,blue,nir (default: Landsat-8 "
            "numbering, band 1 coastal, 2 blue, 3 green, 4 red, 5 nir, 6 swir1, 7 swir2)."
        ),
    )
    features: FeatureSet = Field(
        "indices", description="indices (spectral indices) | bands (reflectance of every band) | both."
    )
    indices: CommaList = Field(
        None,
        description=f"Spectral indices, of {', '.join(INDICES)} (default: {','.join(SEED_004_INDICES)}).",
    )
    patch: int = Field(
        1, ge=1, le=63, description="K: a row per labelled pixel with its K x K neighbourhood (odd K)."
    )
    class_names: CommaList = Field(
        None, description="Names of class ids 1..N, comma-separated (default: class_1..class_N)."
    )
    nodata: float | None = Field(
        None, description="The bands' fill value: such pixels are skipped (default: the GDAL_NODATA tag)."
    )
    scale: float | None = Field(
        None,
        description="Reflectance = value * scale + offset (default: Landsat Collection 2's 0.0000275 for "
        "integer bands, 1 for float bands).",
    )
    offset: float | None = Field(
        None, description="See scale (default: -0.2 for integer bands, 0 for float bands)."
    )
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Share of pixels in the test split.")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="Share of pixels in the val split.")
    split_block: int = Field(
        1,
        ge=1,
        description="Pixels of one BLOCK x BLOCK square share a split (less leakage between neighbours).",
    )
    seed: int = Field(0, ge=0, description="Same seed, same splits (on any cluster).")
    window_rows: int | None = Field(
        None, ge=1, description="Raster rows per task (default: about 262k pixels / K^2 a task)."
    )
    overwrite: bool = Field(
        False, description="Replace an output that already holds data (refused otherwise)."
    )


def check(p: Any) -> None:
    if p.patch % 2 == 0:
        raise ParamError("patch", f"{p.patch} is even; a patch has a centre pixel, so K is odd")
    if p.test_fraction + p.val_fraction >= 1:
        raise ParamError("test_fraction", "test_fraction + val_fraction leave no training pixels")
    unknown = [i for i in p.indices or () if i.lower() not in INDICES]
    if unknown:
        raise ParamError("indices", f"unknown index {', '.join(unknown)}; known: {', '.join(INDICES)}")


def run(spark: SparkSession, p: Any, progress: Progress) -> dict[str, Any]:
    from sparkvision.data.raster_ingest import ingest_raster

    return ingest_raster(
        spark,
        p.raster,
        p.labels,
        p.table,
        bands=p.bands,
        features=p.features,
        indices=p.indices or SEED_004_INDICES,
        patch=p.patch,
        class_names=p.class_names,
        nodata=p.nodata,
        scale=p.scale,
        offset=p.offset,
        test_fraction=p.test_fraction,
        val_fraction=p.val_fraction,
        split_block=p.split_block,
        seed=p.seed,
        window_rows=p.window_rows,
    ).to_json()


OPERATION = register(
    Operation(
        "ingest-raster",
        IngestRasterParams,
        run,
        "Ingest a multiband GeoTIFF and its label raster into a table of spectral feature vectors.",
        inputs=("raster", "labels"),
        outputs=("table",),
        staged_outputs=("table",),
        result_key="table",
        module="sparkvision.data.raster_ingest",
        check=check,
        summary_keys=("rows_written", "elapsed_s", "pixels_per_s"),
    )
)
